"""fastclip_kernels.bench: CLI, outputs (CSV / markdown / PNG) and the CPU peak-memory measurement."""

from __future__ import annotations

import csv

import pytest
import torch
from fastclip_kernels import bench, chunked, reference
from torch.utils.flop_counter import FlopCounterMode


def test_bench_writes_csv_markdown_and_plot(tmp_path) -> None:
    out = {k: tmp_path / f"r.{k}" for k in ("csv", "md", "png")}
    argv = ["--device", "cpu", "--batch", "64,96", "--dim", "16", "--impl", "chunked,openclip", "--repeats", "1"]
    argv += ["--loss", "fastclip", "--csv", str(out["csv"]), "--markdown", str(out["md"]), "--plot", str(out["png"])]
    assert bench.main(argv) == 0
    with out["csv"].open() as f:
        header = next(csv.reader(f))
        f.seek(0)
        rows = list(csv.DictReader(f))
    assert header[:7] == ["impl", "B", "d", "device", "ms", "tflops", "peak_mem_bytes"]
    assert [(r["impl"], r["B"], r["d"]) for r in rows] == [
        ("chunked", "64", "16"),
        ("openclip", "64", "16"),
        ("chunked", "96", "16"),
        ("openclip", "96", "16"),
    ]
    for r in rows:
        assert r["status"] == "ok" and float(r["ms"]) > 0 and int(r["peak_mem_bytes"]) > 0
        assert float(r["tflops"]) == pytest.approx(bench.step_flops(int(r["B"]), 16, "fastclip") / float(r["ms"]) / 1e9)
        peer = next(p for p in rows if p["impl"] == "openclip" and p["B"] == r["B"])  # the ratio is to the same B
        assert float(r["time_vs_openclip"]) == pytest.approx(float(r["ms"]) / float(peer["ms"]))
        assert float(r["mem_vs_openclip"]) == pytest.approx(int(r["peak_mem_bytes"]) / int(peer["peak_mem_bytes"]))
        assert float(r["model_h100_ms"]) > 0 if r["impl"] == "chunked" else r["model_h100_ms"] == "nan"
    table = out["md"].read_text()
    assert "| chunked | 96 | 16 |" in table and "% matmul" in table and "Model, `fastclip`, B = 96" in table
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--impl", "chunked,fast"], "unknown impl"),
        (["--batch", "1"], "integers >= 2"),
        (["--device", "cpu", "--impl", "triton"], "needs --device cuda"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bench_rejects_bad_arguments(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["clip", "fastclip"])
def test_counted_flops_match_the_timed_step(loss: str) -> None:
    """The FLOPs the rate is counted at are the products the timed step runs (dense impl: all plain ``mm``)."""
    step = bench.make_step("dense", loss, 64, 16, torch.float32, "cpu")
    with FlopCounterMode(display=False) as counter:
        step()
    assert counter.get_total_flops() == bench.step_flops(64, 16, loss)


def test_cpu_peak_bytes_counts_tensor_allocations() -> None:
    """A known allocation pattern: 4 MiB live, then 8 MiB more, freed: high-water 12 MiB (+ small extras)."""

    def fn() -> None:
        a = torch.empty(1 << 20)
        b = torch.empty(2 << 20)
        del a, b

    assert (12 << 20) <= bench.cpu_peak_bytes(fn) < (12 << 20) + (1 << 16)


def test_chunked_memory_is_bounded_by_the_tile() -> None:
    """Chunked stats + grads at M = N = 2048 keep a few [M, chunk] tiles, far below one M×N float32 matrix."""
    x = torch.nn.functional.normalize(torch.randn(2048, 32), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(2048, 32), dim=-1)
    th = torch.tensor([20.0])
    st = chunked.block_stats(x, y, th, th, chunk=128)
    coeffs = ((th, st.lse_row, torch.ones(2048)), (th, st.lse_col, torch.ones(2048)))
    full = 2048 * 2048 * 4

    def chunked_run() -> None:
        chunked.block_stats(x, y, th, th, chunk=128)
        chunked.block_grads(x, y, *coeffs, chunk=128)

    def dense_run() -> None:
        reference.block_stats(x, y, th, th)
        reference.block_grads(x, y, *coeffs)

    assert bench.cpu_peak_bytes(chunked_run) < full / 4
    assert bench.cpu_peak_bytes(dense_run) > full


def _kernel_calls(monkeypatch) -> list[tuple]:
    """Record every call that reaches an implementation through ``fastclip_kernels.block_stats/block_grads``."""
    from fastclip_kernels import dispatch

    calls: list[tuple] = []
    real = dispatch._module

    class Recorder:
        def __init__(self, module) -> None:
            self.module = module

        def block_stats(self, x, y, theta_row, theta_col, diag_offset, exclude_diag):
            calls.append(("stats", tuple(x.shape), tuple(y.shape), theta_col is None, diag_offset, exclude_diag))
            return self.module.block_stats(x, y, theta_row, theta_col, diag_offset, exclude_diag)

        def block_grads(self, x, y, row, col, diag_offset, exclude_diag, *, need_dy):
            sides = (row is not None, col is not None)
            calls.append(("grads", tuple(x.shape), tuple(y.shape), sides, diag_offset, exclude_diag, need_dy))
            return self.module.block_grads(x, y, row, col, diag_offset, exclude_diag, need_dy=need_dy)

    monkeypatch.setattr(dispatch, "_module", lambda impl, x: Recorder(real(impl, x)))
    return calls


def test_bench_fastclip_row_makes_the_training_loss_kernel_calls(monkeypatch) -> None:
    """The bench's FastCLIP row times what training runs: FastClipLoss (fastclip_v3, one process) and the bench
    step call the same entry points, the same kernels, in the same order, with the same shapes and flags."""
    import fastclip_kernels as fk

    import fastclip_ds.losses.fastclip as training
    from fastclip_ds.losses import build_loss

    assert training.block_stats is fk.block_stats and training.block_grads is fk.block_grads
    calls = _kernel_calls(monkeypatch)
    b, d = 24, 8
    bench.make_step("chunked", "fastclip", b, d, torch.float32, "cpu")()
    bench_calls = list(calls)
    calls.clear()
    loss = build_loss({"name": "fastclip_v3", "impl": "chunked"}, dataset_size=b, steps_per_epoch=1)
    x, t = (torch.nn.functional.normalize(torch.randn(b, d), dim=-1).requires_grad_() for _ in range(2))
    loss(x, t, torch.tensor([1 / 0.07]), torch.arange(b))["loss"].backward()
    assert [c[0] for c in bench_calls] == ["stats", "stats", "grads", "grads"]
    assert calls == bench_calls
