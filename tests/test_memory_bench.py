"""``fastclip-ds bench-memory`` end to end on the micro model (no timing is checked: performance lives in the
benchmark's own output)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from .test_train import run


@pytest.mark.slow
def test_bench_memory_writes_csv_markdown_and_png(tmp_path: Path) -> None:
    """Two micro-batches × checkpointing off/on for one loss: four rows with positive peaks, each ratio taken against
    the same loss's whole batch without checkpointing (that row's ratios are exactly 1), accumulation = global /
    micro-batch. Catches a setting that crashes (e.g. accumulation or checkpointing broken on the bench's path),
    a ratio against the wrong baseline, or a missing output file."""
    out = tmp_path / "bench"
    args = ["--model", "fastclip-micro", "--global-batch", "16", "--splits", "1", "4", "--losses", "openclip"]
    proc = run([sys.executable, "-m", "fastclip_ds.cli", "bench-memory", *args, "--jobs", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "memory.csv").open()))
    settings = [(r["micro_batch"], r["accumulation"], r["checkpointing"]) for r in rows]
    assert settings == [("16", "1", "False"), ("4", "4", "False"), ("16", "1", "True"), ("4", "4", "True")]
    assert all(float(r["peak_mb"]) > 0 and float(r["samples_per_s"]) > 0 for r in rows)
    assert float(rows[0]["peak_ratio"]) == 1.0 and float(rows[0]["time_ratio"]) == 1.0
    assert "| openclip | 4 | 4 | on |" in (out / "memory.md").read_text()
    assert (out / "memory.png").read_bytes()[:4] == b"\x89PNG"
