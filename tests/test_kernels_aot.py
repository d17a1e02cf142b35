"""The Triton kernels compiled ahead of time for sm_90a and sm_80 without a GPU, and the traffic / FLOP model.

The compile runs ``python -m fastclip_kernels.aot`` in a subprocess (interpreted kernels do not compile);
results are cached per variant under ``~/.cache/fastclip_kernels/aot`` (``$FASTCLIP_AOT_CACHE``), so an
unchanged kernel costs no compile (cold: minutes, warm: seconds; see kernels/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastclip_kernels import schedule

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
B, D = 32768, 512


@pytest.fixture(scope="module")
def aot_results() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "fastclip_kernels.aot", "--d", str(D)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_dispatcher_variant_compiles_within_the_targets_limits(aot_results: list[dict]) -> None:
    """Each (kernel, sides, target, dtype) the dispatcher can launch at d = 512 compiles; registers ≤ 255 and
    shared memory within the target's limit (a config too big for sm_80's 163 KB fails here)."""
    names = {r["name"] for r in aot_results}
    for arch in ("sm_90", "sm_80"):
        for dtype in ("bfloat16", "float16", "float32"):
            for kernel in ("_stats_kernel[row]", "_stats_kernel[row+col]", "_pass_kernel[own]", "_pass_kernel[other]"):
                assert f"{kernel} {arch} {dtype} d={D}" in names
    assert len(aot_results) == 30
    for r in aot_results:
        arch = r["name"].split()[1]
        assert r["registers"] <= 255, r
        assert r["shared_bytes"] <= SHARED_LIMIT[arch], r


def test_bf16_dots_use_bf16_tensor_cores_without_spills(aot_results: list[dict]) -> None:
    """bf16: every dot is a wgmma (sm_90) / mma.sync m16n8k16 (sm_80) on bf16 operands (no upcast to TF32),
    loads are software-pipelined (cp.async), and nothing spills; fp16 runs TF32 MMAs; fp32 no tensor cores."""
    for r in aot_results:
        name, mma = r["name"], r["mma"]
        if " bfloat16 " in name:
            assert mma and all(".bf16.bf16" in m for m in mma), r
            assert all(m.startswith("wgmma" if " sm_90 " in name else "mma.sync.aligned.m16n8k16") for m in mma), r
            assert r["async_copies"] and r["spill_bytes"] == 0, r
        elif " float16 " in name:
            assert mma and all(".tf32.tf32" in m for m in mma), r
        else:
            assert mma == [], r


def test_auto_eligible_dtypes_are_spill_free(aot_results: list[dict]) -> None:
    """``auto`` sends a dtype to Triton only if all its variants compile without spills (else the chunked path)."""
    for dtype in schedule.SPILL_FREE:
        assert all(r["spill_bytes"] == 0 for r in aot_results if f" {dtype} " in r["name"])
    for dtype in ("bfloat16", "float16", "float32"):
        expect = "triton" if dtype in schedule.SPILL_FREE else "chunked"
        assert schedule.fastest(B, D, dtype, 90) == expect


def test_model_counts_the_previous_backward_as_the_issue_does() -> None:
    """Hand count of the atomic schedule (64×64 tiles, B = 32768, d = 512): fp32 dx read+write per tile pair
    (the issue's ~64 GiB) and fp32 dy atomics (~34 GB), 6·B²·d FLOPs."""
    (old,) = schedule.atomic_backward_cost(B, B, D, "bfloat16", schedule.H100)
    pairs = (B // 64) ** 2
    rmw, atomics = pairs * 2 * 64 * D * 4, pairs * 64 * D * 4
    assert rmw == 64 * 2**30 and old.flops == 6 * B * B * D
    assert old.hbm_bytes >= rmw + atomics


def test_model_split_backward_is_a_tenth_of_the_old_traffic() -> None:
    """Must-show: backward DRAM bytes ≤ 1/10 of the old schedule's, and the held passes stream the candidates
    once per row block: (B/64)·B·d·2 bytes each (L2 level), 4·B²·d FLOPs each."""
    new = schedule.backward_cost(B, B, D, "bfloat16", schedule.H100)
    (old,) = schedule.atomic_backward_cost(B, B, D, "bfloat16", schedule.H100)
    assert sum(c.hbm_bytes for c in new) <= old.hbm_bytes / 10
    for c in new:
        assert c.flops == 4 * B * B * D
        stream = (B // schedule.config("bwd", "bfloat16", 90, D).block_m) * B * D * 2
        assert stream <= c.l2_bytes <= stream * 1.05
    assert sum(c.l2_bytes for c in new) <= old.l2_bytes / 4


def test_model_predicts_fwd_bwd_near_the_4_gemm_floor() -> None:
    """Must-show: predicted forward+backward on an H100 within 1.5× of 8·B²·d FLOPs at 800 TFLOP/s; the old
    backward is predicted several times slower; on an H200 (more bandwidth) never slower."""
    floor = 8 * B * B * D / 800e12
    assert schedule.floor_time(B, D, schedule.H100) == pytest.approx(floor)
    t = schedule.step_time("triton", B, D, "bfloat16", schedule.H100)
    assert t <= 1.5 * floor
    assert schedule.step_time("triton-atomic", B, D, "bfloat16", schedule.H100) > 3 * t
    assert schedule.step_time("triton", B, D, "bfloat16", schedule.H200) <= t
