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
        assert float(r["tflops"]) == pytest.approx(bench.step_flops(int(r["B"]), 16) / float(r["ms"]) / 1e9)
    assert all(float(r["time_vs_openclip"]) == 1.0 for r in rows if r["impl"] == "openclip")
    table = out["md"].read_text()
    assert "| chunked | 96 | 16 |" in table and "% matmul" in table
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
    assert counter.get_total_flops() == bench.step_flops(64, 16)


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
