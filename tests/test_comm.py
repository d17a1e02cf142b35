"""The comm layer: packed gathers of mixed dtypes, the autograd gather, all-reduce, and the ring byte counts."""

from __future__ import annotations

import torch

from fastclip_ds import comm
from fastclip_ds.comm_bench import bench, spawn


def local_tensors(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [
        torch.randn(3, 4, generator=g).to(torch.bfloat16),
        torch.randn(3, 2, 2, generator=g, dtype=torch.float64),
        torch.tensor([2**62 + rank, -1, rank], dtype=torch.int64),
    ]


def comm_worker(rank: int, world: int) -> dict:
    import deepspeed.comm as dist

    dist.configure(enabled=True, prof_all=True)  # DeepSpeed's comms logger, as the engine would log its own ops
    dist.reset_log()
    comm.reset_bytes()
    gathered = comm.all_gather_rows(local_tensors(rank), op="packed")
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    xs = comm.gather_with_grad(x, op="feat")
    (xs * torch.arange(1.0, 2 * world + 1)[:, None]).sum().backward()  # row i of xs gets weight i + 1 on every rank
    total = comm.all_reduce_sum_(torch.full((5,), float(rank), dtype=torch.float64), op="sum")
    dist.all_reduce(torch.ones(6))  # an engine-style op under DeepSpeed's default log name
    dist.all_reduce(torch.ones(6))
    return {
        "gathered": gathered,
        "xs": xs.detach(),
        "x_grad": x.grad,
        "sum": total,
        "bytes": comm.bytes_by_op(),
        "ds_bytes": comm.deepspeed_bytes_by_op(),
    }


def test_single_process_is_identity() -> None:
    comm.reset_bytes()
    tensors = local_tensors(0)
    assert all(torch.equal(a, b) for a, b in zip(comm.all_gather_rows(tensors, op="p"), tensors, strict=True))
    x = torch.ones(2, 3, requires_grad=True)
    assert comm.gather_with_grad(x, op="f") is x
    assert comm.bytes_by_op() == {}
    assert (comm.world_size(), comm.rank()) == (1, 0)


def test_collectives_on_two_ranks() -> None:
    world = 2
    results = spawn(world, comm_worker, timeout=120)
    expected = [torch.cat([local_tensors(r)[i] for r in range(world)]) for i in range(3)]
    for rank, r in enumerate(results):
        for got, want in zip(r["gathered"], expected, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert torch.equal(r["xs"][:, 0], torch.tensor([1.0, 1.0, 2.0, 2.0]))
        # the backward sums every rank's gradient of the gathered rows: world * (row index + 1), own rows only
        own = torch.arange(2 * rank + 1.0, 2 * rank + 3.0)
        assert torch.equal(r["x_grad"], (world * own)[:, None].expand(2, 3))
        assert torch.equal(r["sum"], torch.full((5,), 1.0, dtype=torch.float64))
        packed_row = 4 * 2 + 4 * 8 + 8  # bf16[4] + f64[2,2] + int64 bytes per row
        assert r["bytes"] == {
            "packed": (world - 1) * 3 * packed_row,
            "feat": (world - 1) * 2 * 3 * 4,
            "feat_grad": (world - 1) * 2 * 3 * 4,  # reduce-scatter: (K-1)/K of the [K*2, 3] input
            "sum": 2 * (world - 1) * 5 * 8 // world,
        }
        assert r["ds_bytes"] == {"all_reduce": 2 * 2 * (world - 1) * 6 * 4 // world}  # ours are not double counted


def test_bench_fastclip_sends_about_half_of_openclip() -> None:
    """Ring bytes per rank and step: openclip gathers [x|t] and reduce-scatters its gradient, fastclip gathers
    [x|t|key] once plus small state/u collectives; the issue's target is <= 0.55x."""
    k, b, d, item = 2, 8, 256, 2  # bf16 features
    rows = {(r["loss"], r["op"]): r["bytes"] for r in bench([k], b, d, "bf16", ["openclip", "fastclip_v3"])}
    assert rows[("openclip", "feature")] == 2 * (k - 1) * b * 2 * d * item
    assert rows[("fastclip_v3", "fastclip_features")] == (k - 1) * b * (2 * d * item + 8)
    assert rows[("fastclip_v3", "fastclip_state")] == 2 * (k - 1) * b * 2 * 4  # all-reduce of [K*B, 2] fp32 log u
    assert rows[("fastclip_v3", "fastclip_g")] == (k - 1) * b * 2 * 4  # all-gather of [B, 2] fp32 log g
    assert rows[("fastclip_v3", "loss total")] <= 0.55 * rows[("openclip", "loss total")]
