"""Block sizes of the Triton kernels and a traffic / FLOP model of every schedule (pure Python).

Configs (:func:`config`) are chosen per kernel, operand dtype, target (sm_80 / sm_90) and ``d``;
the interpreter tests and the ahead-of-time compile test use the same ones as a GPU. With ``d``
padded to a power of two ``d_pad <= HOLD_MAX_D`` a program holds its anchor block ``[BLOCK_M, d]``
on chip and loads each candidate tile ``[BLOCK_N, d]`` once per visit ("hold"); above it the
similarity is built by a K-loop and the accumulator is split over ``cdiv(d, BLOCK_D)`` programs
("split", which recomputes ``S`` once per split).

The model (:func:`step_costs`) counts per kernel: tensor-core FLOPs, exponentials, bytes the
kernel's loads, stores and atomics request from global memory (``l2_bytes``: every request, served
by L2 or DRAM) and an estimate of DRAM bytes (``hbm_bytes``: each tensor once, plus re-streams of an
operand that does not fit L2 once per wave of programs, plus fp32 accumulator read-modify-write and
atomics, which the issue counts as DRAM traffic). Predicted time is the largest of FLOPs / matmul
rate, exps / MUFU rate, ``l2_bytes`` / L2 bandwidth and ``hbm_bytes`` / DRAM bandwidth (tensor
cores, MUFU and memory overlapped, as a pipelined kernel approaches), plus a launch latency.
"""

from __future__ import annotations

import math
from typing import NamedTuple

HOLD_MAX_D = 512
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
# Dtypes whose every Triton variant compiles without spills (checked by tests/test_kernels_aot.py);
# ``auto`` picks Triton only for these and sends the others to the chunked (cuBLAS) path.
SPILL_FREE = ("bfloat16",)


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int  # K-chunk of the similarity; == block_d when the anchor block is held
    block_d: int  # accumulator width (backward) / held feature width
    warps: int
    stages: int
    d_split: int  # programs per row block along d (backward, split mode)

    @property
    def hold(self) -> bool:
        return self.block_k == self.block_d and self.d_split == 1


# (kind, operand class, arch) -> (BLOCK_M, BLOCK_N, warps, stages) in hold mode. Operand class: "16" for
# bf16 dots, "32" for fp32 operands on tensor cores (fp16 as rounded TF32), "fma" for IEEE fp32 (no tensor
# cores; never held: a K = d dot on FMA units unrolls into minutes of compile and thousands of spill bytes).
# Shared memory in hold mode is BLOCK_M·d·e (held block) + stages·BLOCK_N·d·e (candidate tiles): ≤ 192 KB at
# d = 512 on sm_90, ≤ 128 KB on sm_80.
_HOLD = {
    ("fwd", "16", 90): (128, 32, 8, 2),
    ("fwd", "16", 80): (64, 32, 4, 2),
    ("fwd", "32", 90): (64, 32, 8, 2),
    ("fwd", "32", 80): (32, 32, 4, 2),
    ("bwd", "16", 90): (64, 32, 8, 2),
    ("bwd", "16", 80): (64, 16, 8, 2),
    ("bwd", "32", 90): (64, 16, 8, 2),
    ("bwd", "32", 80): (32, 16, 4, 2),
}
# Split mode (d > HOLD_MAX_D, and fp32 at any d): (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, warps, stages).
_SPLIT = {"16": (64, 64, 64, 256, 8, 3), "32": (64, 32, 32, 128, 8, 2), "fma": (64, 32, 32, 128, 8, 2)}


def operand_class(dtype: str) -> str:
    return {"bfloat16": "16", "float16": "32"}.get(dtype, "fma")


def padded(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def config(kind: str, dtype: str, arch: int, d: int) -> Config:
    """Block sizes for ``kind`` ("fwd" or "bwd") at operand ``dtype`` (torch name), ``arch`` 80 or 90, dim ``d``."""
    cls, arch = operand_class(dtype), 90 if arch >= 90 else 80
    d_pad = padded(d)
    if d_pad <= HOLD_MAX_D and cls != "fma":
        bm, bn, warps, stages = _HOLD[(kind, cls, arch)]
        return Config(bm, bn, d_pad, d_pad, warps, stages, 1)
    bm, bn, bk, bd, warps, stages = _SPLIT[cls]
    return Config(bm, bn, bk, bd, warps, stages, math.ceil(d / bd) if kind == "bwd" else 1)


class Hardware(NamedTuple):
    name: str
    arch: int
    matmul: dict[str, float]  # FLOP/s of the dots per operand dtype, measured-class (not peak)
    exp_rate: float  # exponentials per second (MUFU)
    hbm: float  # DRAM bytes per second
    l2: float  # L2 bytes per second (assumed; no public datasheet figure)
    l2_bytes: float
    sms: int
    launch_s: float = 5e-6


# bf16 matmul at the notes' measured class (800 of 989 TFLOP/s); TF32 and fp32 at the same fraction of
# their peaks (495, 67). MUFU 3.9 T exp/s (FlashAttention-3). L2 ≈ 7 TB/s (SXM; a PCIe H100 measured 5.5).
_H100_MM = {"bfloat16": 800e12, "float16": 400e12, "float32": 54e12}
H100 = Hardware("H100 SXM", 90, _H100_MM, 3.9e12, 3.35e12, 7e12, 50e6, 132)
H200 = Hardware("H200 SXM", 90, _H100_MM, 3.9e12, 4.8e12, 7e12, 50e6, 132)
A100 = Hardware(
    "A100 SXM 80GB", 80, {"bfloat16": 250e12, "float16": 125e12, "float32": 16e12}, 2.4e12, 2.0e12, 4e12, 40e6, 108
)


class Cost(NamedTuple):
    kernel: str
    flops: float
    exps: float
    l2_bytes: float
    hbm_bytes: float
    matmul_dtype: str  # which matmul rate the flops run at

    def time(self, hw: Hardware) -> float:
        return hw.launch_s + max(
            self.flops / hw.matmul[self.matmul_dtype],
            self.exps / hw.exp_rate,
            self.l2_bytes / hw.l2,
            self.hbm_bytes / hw.hbm,
        )

    def bound(self, hw: Hardware) -> str:
        terms = {
            "matmul": self.flops / hw.matmul[self.matmul_dtype],
            "exp": self.exps / hw.exp_rate,
            "L2": self.l2_bytes / hw.l2,
            "DRAM": self.hbm_bytes / hw.hbm,
        }
        return max(terms, key=terms.get)


def _stream(bytes_once: float, programs: int, hw: Hardware) -> float:
    """DRAM bytes of an operand every program streams: once if it fits half of L2, else once per wave."""
    return bytes_once if bytes_once <= hw.l2_bytes / 2 else bytes_once * math.ceil(programs / hw.sms)


def forward_cost(m: int, n: int, d: int, dtype: str, hw: Hardware, col: bool = True) -> list[Cost]:
    """``_stats_kernel`` plus the host merge of the column partials."""
    c, e = config("fwd", dtype, hw.arch, d), ITEMSIZE[dtype]
    rb = math.ceil(m / c.block_m)
    reads_x = m * d * e * (1 if c.hold else math.ceil(n / c.block_n))
    partials = 8 * rb * n if col else 0
    small = 8 * m + 4 * (m + rb * n)  # row outputs, θ loads
    l2 = reads_x + rb * n * d * e + partials + small
    hbm = m * d * e + _stream(n * d * e, rb, hw) + partials + small
    costs = [Cost("fwd stats", 2 * m * n * d, m * n * (1 + col), l2, hbm, dtype)]
    if col:  # logsumexp over the partials + the weighted mean: ~4 passes over them
        costs.append(Cost("fwd column merge", 0, 2 * rb * n, 4 * partials, 4 * partials, dtype))
    return costs


def _pass_cost(m: int, n: int, d: int, dtype: str, hw: Hardware, sides: int, name: str) -> Cost:
    """One pass of the split backward: ``m`` anchors own their rows and walk ``n`` candidates."""
    c, e = config("bwd", dtype, hw.arch, d), ITEMSIZE[dtype]
    rb, cb = math.ceil(m / c.block_m), math.ceil(n / c.block_n)
    coeff = 12 * (m + rb * n * c.d_split)
    if c.hold:
        l2 = m * d * e + rb * n * d * e + coeff + m * d * e
        flops = 4 * m * n * d
    else:
        l2 = c.d_split * (cb * m * d * e + rb * n * d * e) + rb * n * d * e + coeff + m * d * e
        flops = 2 * m * n * d * (c.d_split + 1)
    hbm = 2 * m * d * e + _stream(n * d * e, rb * c.d_split, hw) + coeff
    return Cost(name, flops, m * n * sides * c.d_split, l2, hbm, dtype)


def backward_cost(m: int, n: int, d: int, dtype: str, hw: Hardware, sides: int = 2, need_dy: bool = True) -> list[Cost]:
    """The split backward: a pass over row blocks for ``dx`` and one over column blocks for ``dy``."""
    costs = [_pass_cost(m, n, d, dtype, hw, sides, "bwd dx pass")]
    if need_dy:
        costs.append(_pass_cost(n, m, d, dtype, hw, sides, "bwd dy pass"))
    return costs


def atomic_backward_cost(m: int, n: int, d: int, dtype: str, hw: Hardware, sides: int = 2) -> list[Cost]:
    """The previous schedule (64×64×64 tiles): per tile pair a K-loop for ``S``, then per K-chunk a
    read-modify-write of the fp32 ``dx`` block and ``tl.atomic_add`` of the fp32 ``dy`` block."""
    bm = bn = 64
    e = ITEMSIZE[dtype]
    pairs = math.ceil(m / bm) * math.ceil(n / bn)
    operands = pairs * 2 * (bm + bn) * d * e  # x, y tiles for S, again for the products
    rmw = pairs * 2 * bm * d * 4  # dx read + write
    atomics = pairs * bn * d * 4  # dy atomic adds
    out = 2 * (m + n) * d * 4 + (m + n) * d * e  # zero-fill fp32 buffers, cast to dtype
    return [
        Cost(
            "bwd (atomic dy, RMW dx)",
            6 * m * n * d,
            m * n * sides,
            operands + rmw + atomics + out,
            rmw + atomics + out + (m + n) * d * e,
            dtype,
        )
    ]


def chunked_cost(
    m: int, n: int, d: int, dtype: str, hw: Hardware, col: bool = True, need_dy: bool = True
) -> list[Cost]:
    """The chunked PyTorch path on CUDA: cuBLAS GEMMs in float32 (inputs upcast, TF32 off) and float32
    elementwise passes over each ``[M, chunk]`` tile: ~10 for row statistics (+8 for the column side) in the
    forward, ~22 in the backward."""
    tile, feats = 4 * m * n, 4 * (m + n) * d
    fwd = (10 + 8 * col) * tile + feats
    bwd = 22 * tile + (2 + need_dy) * feats
    return [
        Cost("chunked fwd", 2 * m * n * d, (1 + col) * m * n, fwd, fwd, "float32"),
        Cost("chunked bwd", (4 + 2 * need_dy) * m * n * d, 2 * m * n, bwd, bwd, "float32"),
    ]


def step_costs(impl: str, b: int, d: int, dtype: str, hw: Hardware, loss: str = "clip") -> list[Cost]:
    """Kernels of one forward + backward of ``loss`` at batch ``b`` on one process.

    ``clip`` (``clip_loss``): one forward with row and column statistics, both gradients. ``fastclip``
    (``fastclip_surrogate``, the training loss's calls): two row-only forwards and two ``dx``-only passes.
    ``impl``: "triton" (split backward), "triton-atomic" (the previous backward), "chunked".
    """
    if loss == "fastclip":
        if impl == "chunked":
            one = chunked_cost(b, b, d, dtype, hw, col=False, need_dy=False)
        else:
            one = forward_cost(b, b, d, dtype, hw, col=False) + backward_cost(b, b, d, dtype, hw, need_dy=False)
        return one + [c._replace(kernel=c.kernel + " (text anchors)") for c in one]
    if impl == "chunked":
        return chunked_cost(b, b, d, dtype, hw)
    bwd = atomic_backward_cost if impl == "triton-atomic" else backward_cost
    return forward_cost(b, b, d, dtype, hw) + bwd(b, b, d, dtype, hw)


def step_time(impl: str, b: int, d: int, dtype: str, hw: Hardware, loss: str = "clip") -> float:
    return sum(c.time(hw) for c in step_costs(impl, b, d, dtype, hw, loss))


def floor_time(b: int, d: int, hw: Hardware, dtype: str = "bfloat16") -> float:
    """The 4-GEMM compute floor: 8·B²·d FLOPs at the matmul rate."""
    return 8 * b * b * d / hw.matmul[dtype]


def fastest(b: int, d: int, dtype: str, arch: int) -> str:
    """``"triton"`` or ``"chunked"``: the model's faster choice on the class of GPU ``arch`` names
    (Triton only for dtypes in ``SPILL_FREE``)."""
    if dtype not in SPILL_FREE:
        return "chunked"
    hw = H100 if arch >= 90 else A100
    return min(("triton", "chunked"), key=lambda impl: step_time(impl, b, d, dtype, hw))


def report(b: int, d: int, dtype: str, loss: str = "clip", hws: tuple[Hardware, ...] = (H100, H200)) -> str:
    """A markdown table of the model for one step of ``loss`` under each schedule, with predicted times."""
    impls = ("triton", "triton-atomic", "chunked") if loss == "clip" else ("triton", "chunked")
    lines = [
        f"Model, `{loss}`, B = {b}, d = {d}, {dtype}: per kernel FLOPs, exps, bytes requested from global memory "
        "(L2 level), estimated DRAM bytes, predicted time (limiting unit).",
        "",
        "| schedule | kernel | TFLOP | G exp | L2-level GB | DRAM GB | "
        + " | ".join(f"{hw.name} ms (bound)" for hw in hws)
        + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(hws),
    ]
    for impl in impls:
        for c in step_costs(impl, b, d, dtype, hws[0], loss):
            times = " | ".join(f"{c.time(hw) * 1e3:.2f} ({c.bound(hw)})" for hw in hws)
            lines.append(
                f"| {impl} | {c.kernel} | {c.flops / 1e12:.2f} | {c.exps / 1e9:.2f} | {c.l2_bytes / 1e9:.2f} | "
                f"{c.hbm_bytes / 1e9:.2f} | {times} |"
            )
    lines.append("")
    for hw in hws:
        parts = ", ".join(f"{impl} {step_time(impl, b, d, dtype, hw, loss) * 1e3:.2f} ms" for impl in impls)
        lines.append(f"{hw.name}: forward+backward {parts}; 4-GEMM floor {floor_time(b, d, hw) * 1e3:.2f} ms.")
    return "\n".join(lines) + "\n"
