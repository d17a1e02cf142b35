"""The comm layer: packed gathers of mixed dtypes, the autograd gather, all-reduces, the ring byte counts, and
no collective anywhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fastclip_ds import comm, signals
from fastclip_ds.comm_bench import bench
from fastclip_ds.multiproc import spawn

REPO = Path(__file__).parents[1]
COMM_MODULES = ("torch.distributed", "deepspeed.comm")
COLLECTIVES = {
    "all_gather", "all_gather_coalesced", "all_gather_into_tensor", "all_gather_object", "all_reduce",
    "all_reduce_coalesced", "all_to_all", "all_to_all_single", "barrier", "batch_isend_irecv", "broadcast",
    "broadcast_object_list", "gather", "gather_object", "inference_all_reduce", "irecv", "isend",
    "monitored_barrier", "recv", "reduce", "reduce_scatter", "reduce_scatter_fn", "reduce_scatter_tensor", "scatter",
    "scatter_object_list", "send",
}  # fmt: skip


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
    flags = signals.agree([rank, 1 - rank, 0], torch.device("cpu"))  # int64[3], element-wise max
    comm.barrier("barrier")  # no payload: not counted
    dist.all_reduce(torch.ones(6))  # an engine-style op under DeepSpeed's default log name
    dist.all_reduce(torch.ones(6))
    return {
        "gathered": gathered,
        "xs": xs.detach(),
        "x_grad": x.grad,
        "sum": total,
        "flags": flags,
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
        assert r["flags"] == [1, 1, 0]
        packed_row = 4 * 2 + 4 * 8 + 8  # bf16[4] + f64[2,2] + int64 bytes per row
        assert r["bytes"] == {
            "packed": (world - 1) * 3 * packed_row,
            "feat": (world - 1) * 2 * 3 * 4,
            "feat_grad": (world - 1) * 2 * 3 * 4,  # reduce-scatter: (K-1)/K of the [K*2, 3] input
            "sum": 2 * (world - 1) * 5 * 8 // world,
            "train_agreement": 2 * (world - 1) * 3 * 8 // world,
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


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` -> ``["a", "b", "c"]``; None for any other expression."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def is_collective(path: str) -> bool:
    module, _, name = path.rpartition(".")
    return name in COLLECTIVES and any(module == m or module.startswith(m + ".") for m in COMM_MODULES)


def collective_uses(source: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every collective of torch.distributed / deepspeed.comm that ``source`` imports or
    refers to (called or not), through any alias; names imported relatively (our own modules) never match."""
    tree = ast.parse(source)
    aliases: dict[str, set[str]] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                name = a.asname or a.name.split(".")[0]
                aliases.setdefault(name, set()).add(a.name if a.asname else name)
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                path = f"{'.' * node.level}{node.module or ''}.{a.name}"
                aliases.setdefault(a.asname or a.name, set()).add(path)
                found += [(node.lineno, path)] if is_collective(path) else []
    for node in ast.walk(tree):
        parts = _dotted(node) if isinstance(node, ast.Attribute | ast.Name) else None
        for target in aliases.get(parts[0], ()) if parts else ():
            path = ".".join([target, *parts[1:]])
            found += [(node.lineno, path)] if is_collective(path) else []
    return sorted(set(found))


@pytest.mark.parametrize(
    ("source", "hits"),
    [
        ("import torch.distributed as dist\ndist.all_reduce(t)", ["torch.distributed.all_reduce"]),
        ("import torch\ntorch.distributed.barrier()", ["torch.distributed.barrier"]),
        ("def f():\n    from deepspeed import comm\n    comm.all_reduce(t, group=g)", ["deepspeed.comm.all_reduce"]),
        ("import deepspeed\ndeepspeed.comm.barrier()", ["deepspeed.comm.barrier"]),
        ("from torch.distributed import broadcast as b\nb(t, 0)", ["torch.distributed.broadcast"] * 2),
        ("import deepspeed.comm as dist\nop = dist.reduce_scatter_tensor", ["deepspeed.comm.reduce_scatter_tensor"]),
        ("import torch.distributed as dist\ndist.get_rank(); dist.init_process_group('gloo')", []),
        ("from . import comm\ncomm.barrier('x'); comm.all_reduce_sum_(t, op='y')", []),
        ("from fastclip_ds import comm\ncomm.all_gather_rows([t], op='z')", []),
    ],
)
def test_collective_scanner(source: str, hits: list[str]) -> None:
    """The scanner below must see a collective through every import form, and nothing else."""
    assert [path for _, path in collective_uses(source)] == hits


def test_no_collective_outside_comm() -> None:
    """Every collective goes through fastclip_ds/comm.py, where DeepSpeed's comms logger and our byte counter see
    it; a direct torch.distributed / deepspeed.comm call elsewhere would be traffic nobody counts."""
    files = [f for d in ("fastclip_ds", "kernels", "launchers") for f in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    uses = {
        f"{f.relative_to(REPO)}:{line}": path
        for f in files
        if f != REPO / "fastclip_ds" / "comm.py"
        for line, path in collective_uses(f.read_text())
    }
    assert uses == {}
    assert collective_uses((REPO / "fastclip_ds" / "comm.py").read_text())  # the scanner does see comm.py's
