"""The block contract (see ``reference``) as Triton kernels: ``S`` exists only tile by tile, in registers.

Forward (1 GEMM-equivalent): one program per row block walks all column blocks, building each
``S`` tile with a K-loop (fp32 accumulation), and keeps the row log-sum-exp and softmax-mean
online in base 2 (``exp2`` with log2(e) folded into θ). The same tile gives each column's
partial statistics over the program's rows; they go to a ``[cdiv(M, BLOCK_M), N]`` float32
buffer pair and are merged by a log-sum-exp over that small axis on the host. This keeps the
forward at one pass and deterministic; a lock-free atomic merge of column LSEs would need a fixed
shift, which underflows at τ = 0.01, and a spin lock serialises programs. The buffer costs
8·N·M/BLOCK_M bytes (64 MiB at M = N = 32768, BLOCK_M = 128), 1/64 of one float32 ``S``.

Backward (3 GEMM-equivalents; 2 with ``need_dy=False``): one program per row block recomputes each
``S`` tile, builds ``G = c_r·exp2(θ₂_r·S − b₂_r) + c_c·exp2(θ₂_c·S − b₂_c)`` (zero on masked and
excluded entries), then per K-chunk adds ``G @ y`` into its own rows of a float32 ``dx`` (plain
read-modify-write: no other program touches those rows) and ``Gᵀ @ x`` into ``dy`` with
``tl.atomic_add``. ``need_dy=False`` compiles the kernel without the ``dy`` part (the ``NEED_DY``
constexpr): no ``x`` loads in the K-loop, no ``Gᵀ @ x``, no atomics.

Inputs may be float32, float16 or bfloat16 (statistics and accumulation in float32); see
``_flags`` for how each feeds ``tl.dot``. Under ``TRITON_INTERPRET=1`` the operands are cast to
float32 before ``tl.dot`` (the interpreter multiplies bfloat16 bit patterns).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import BlockStats

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.0 / math.log(2.0)
SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps). The interpreter's cost grows with programs × loop trips: big blocks.
FWD_CONFIG = (128, 128, 64, 4) if INTERPRET else (128, 64, 64, 8)
BWD_CONFIG = (128, 128, 64, 4) if INTERPRET else (64, 64, 64, 4)


@triton.jit
def _s_tile(
    x_ptr,
    y_ptr,
    rows,
    cols,
    M,
    N,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``x[rows] @ y[cols].T`` in float32 (rows/cols out of range read as 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[:, None] * D + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < D), other=0.0)
        yt = tl.load(y_ptr + cols[:, None] * D + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < D), other=0.0)
        if FP32_DOT:
            xt = xt.to(tl.float32)
            yt = yt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(yt), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _admissible(rows, cols, M, N, diag_offset, EXCLUDE: tl.constexpr):
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    if EXCLUDE:
        ok = ok & (cols[None, :] != rows[:, None] + diag_offset)
    return ok


@triton.jit
def _finish(shift, total, weighted):
    """Natural-log LSE and softmax-mean from a base-2 shift, sum of exp2 and weighted sum (empty: -inf, 0)."""
    nonempty = total > 0.0
    safe = tl.where(nonempty, total, 1.0)
    lse = tl.where(nonempty, (shift + tl.log2(safe)) * 0.6931471805599453, float("-inf"))  # ln(2)
    return lse, tl.where(nonempty, weighted / safe, 0.0)


@triton.jit
def _stats_kernel(
    x_ptr,
    y_ptr,
    th_r_ptr,
    th_c_ptr,
    lse_r_ptr,
    mom_r_ptr,
    lse_cp_ptr,
    mom_cp_ptr,
    M,
    N,
    D,
    diag_offset,
    HAS_COL: tl.constexpr,
    EXCLUDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    th_r = tl.load(th_r_ptr + rows, mask=rows < M, other=0.0) * 1.4426950408889634  # log2(e)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s = _s_tile(x_ptr, y_ptr, rows, cols, M, N, D, BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT, PRECISION)
        ok = _admissible(rows, cols, M, N, diag_offset, EXCLUDE)
        t = tl.where(ok, s * th_r[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(t - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc_i = acc_i * alpha + tl.sum(p * s, 1)
        m_i = m_new
        if HAS_COL:
            th_c = tl.load(th_c_ptr + cols, mask=cols < N, other=0.0) * 1.4426950408889634
            tc = tl.where(ok, s * th_c[None, :], float("-inf"))
            cm = tl.max(tc, 0)
            cshift = tl.where(cm == float("-inf"), 0.0, cm)
            q = tl.exp2(tc - cshift[None, :])
            cl = tl.sum(q, 0)
            cmom = tl.sum(q * s, 0)
            lse_c, mom_c = _finish(cshift, cl, cmom)
            tl.store(lse_cp_ptr + pid * N + cols, lse_c, mask=cols < N)
            tl.store(mom_cp_ptr + pid * N + cols, mom_c, mask=cols < N)
    lse, mom = _finish(tl.where(m_i == float("-inf"), 0.0, m_i), l_i, acc_i)
    tl.store(lse_r_ptr + rows, lse, mask=rows < M)
    tl.store(mom_r_ptr + rows, mom, mask=rows < M)


@triton.jit
def _grads_kernel(
    x_ptr,
    y_ptr,
    th_r_ptr,
    b_r_ptr,
    c_r_ptr,
    th_c_ptr,
    b_c_ptr,
    c_c_ptr,
    dx_ptr,
    dy_ptr,
    M,
    N,
    D,
    diag_offset,
    HAS_ROW: tl.constexpr,
    HAS_COL: tl.constexpr,
    EXCLUDE: tl.constexpr,
    NEED_DY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``th``/``b`` arrive pre-multiplied by log2(e), ``c`` = a·θ (see ``block_grads``); ``dy_ptr`` needs NEED_DY."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    if HAS_ROW:
        th_r = tl.load(th_r_ptr + rows, mask=rmask, other=0.0)
        b_r = tl.load(b_r_ptr + rows, mask=rmask, other=0.0)
        c_r = tl.load(c_r_ptr + rows, mask=rmask, other=0.0)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        s = _s_tile(x_ptr, y_ptr, rows, cols, M, N, D, BLOCK_M, BLOCK_N, BLOCK_K, FP32_DOT, PRECISION)
        g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_ROW:
            g += c_r[:, None] * tl.exp2(s * th_r[:, None] - b_r[:, None])
        if HAS_COL:
            th_c = tl.load(th_c_ptr + cols, mask=cmask, other=0.0)
            b_c = tl.load(b_c_ptr + cols, mask=cmask, other=0.0)
            c_c = tl.load(c_c_ptr + cols, mask=cmask, other=0.0)
            g += c_c[None, :] * tl.exp2(s * th_c[None, :] - b_c[None, :])
        g = tl.where(_admissible(rows, cols, M, N, diag_offset, EXCLUDE), g, 0.0)
        if not FP32_DOT:
            g = g.to(x_ptr.dtype.element_ty)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xmask = rmask[:, None] & (ks[None, :] < D)
            ymask = cmask[:, None] & (ks[None, :] < D)
            yt = tl.load(y_ptr + cols[:, None] * D + ks[None, :], mask=ymask, other=0.0)
            if FP32_DOT:
                yt = yt.to(tl.float32)
            dx_ptrs = dx_ptr + rows[:, None] * D + ks[None, :]
            dx_part = tl.dot(g, yt, input_precision=PRECISION)
            tl.store(dx_ptrs, tl.load(dx_ptrs, mask=xmask, other=0.0) + dx_part, mask=xmask)
            if NEED_DY:
                xt = tl.load(x_ptr + rows[:, None] * D + ks[None, :], mask=xmask, other=0.0)
                if FP32_DOT:
                    xt = xt.to(tl.float32)
                dy_part = tl.dot(tl.trans(g), xt, input_precision=PRECISION)
                tl.atomic_add(dy_ptr + cols[:, None] * D + ks[None, :], dy_part, mask=ymask)


def _prepare(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.dtype not in SUPPORTED or y.dtype != x.dtype:
        raise ValueError(f"triton impl needs x, y of one dtype in {SUPPORTED}, got {x.dtype} and {y.dtype}")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [M, d] and [N, d], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device or not (x.is_cuda or INTERPRET):
        raise ValueError("triton impl needs x and y on one CUDA device (or TRITON_INTERPRET=1 on CPU)")
    return x.contiguous(), y.contiguous()


def _vec(t: Tensor, length: int, device: torch.device) -> Tensor:
    """A 1-element or length-``length`` tensor as a contiguous float32 vector on ``device``."""
    return t.detach().to(device=device, dtype=torch.float32).expand(length).contiguous()


def _flags(x: Tensor) -> dict:
    """``tl.dot`` operand handling per input dtype.

    float32 (and anything under the interpreter): IEEE fp32. bfloat16: native 16-bit dots, ``G``
    rounded to bfloat16 (fp32 range). float16: operands cast to fp32 and multiplied as TF32, which
    holds float16 inputs exactly and keeps ``G`` (FastCLIP weights can exceed 65504) from overflowing.
    """
    if INTERPRET or x.dtype == torch.float32:
        return {"FP32_DOT": True, "PRECISION": "ieee"}
    if x.dtype == torch.float16:
        return {"FP32_DOT": True, "PRECISION": "tf32"}
    return {"FP32_DOT": False, "PRECISION": None}


def block_stats(
    x: Tensor,
    y: Tensor,
    theta_row: Tensor,
    theta_col: Tensor | None = None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
) -> BlockStats:
    """Triton ``reference.block_stats`` (float32 statistics)."""
    x, y = _prepare(x, y)
    (m, d), n = x.shape, y.shape[0]
    bm, bn, bk, warps = FWD_CONFIG
    grid = (triton.cdiv(m, bm),)
    f32 = {"dtype": torch.float32, "device": x.device}
    lse_r, mom_r = torch.empty(m, **f32), torch.empty(m, **f32)
    has_col = theta_col is not None
    th_c = _vec(theta_col, n, x.device) if has_col else lse_r
    lse_cp = torch.empty(grid[0], n, **f32) if has_col else lse_r
    mom_cp = torch.empty(grid[0], n, **f32) if has_col else lse_r
    _stats_kernel[grid](
        x, y, _vec(theta_row, m, x.device), th_c, lse_r, mom_r, lse_cp, mom_cp, m, n, d, diag_offset,
        HAS_COL=has_col, EXCLUDE=exclude_diag, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **_flags(x),
    )  # fmt: skip
    if not has_col:
        return BlockStats(lse_r, mom_r, None, None)
    lse_c = torch.logsumexp(lse_cp, 0)
    shift = torch.where(torch.isinf(lse_c), torch.zeros_like(lse_c), lse_c)
    mom_c = (torch.exp(lse_cp - shift) * mom_cp).sum(0)
    return BlockStats(lse_r, mom_r, lse_c, mom_c)


def _coeffs(side: tuple[Tensor, Tensor, Tensor] | None, length: int, dummy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(θ·log2e, b·log2e, a·θ)`` as float32 vectors (``dummy`` pointers when the side is absent)."""
    if side is None:
        return dummy, dummy, dummy
    theta, b, a = (_vec(t, length, dummy.device) for t in side)
    return theta * LOG2E, b * LOG2E, a * theta


def block_grads(
    x: Tensor,
    y: Tensor,
    row: tuple[Tensor, Tensor, Tensor] | None,
    col: tuple[Tensor, Tensor, Tensor] | None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
    *,
    need_dy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Triton ``reference.block_grads``: ``(dx, dy)`` in the input dtype (float32 accumulation).

    ``need_dy=False`` returns ``(dx, None)`` from a kernel compiled without the ``dy`` products and atomics.
    """
    x, y = _prepare(x, y)
    (m, d), n = x.shape, y.shape[0]
    dx = torch.zeros(m, d, dtype=torch.float32, device=x.device)
    dy = torch.zeros(n, d, dtype=torch.float32, device=x.device) if need_dy else None
    if row is not None or col is not None:
        bm, bn, bk, warps = BWD_CONFIG
        _grads_kernel[(triton.cdiv(m, bm),)](
            x, y, *_coeffs(row, m, dx), *_coeffs(col, n, dx), dx, dx if dy is None else dy, m, n, d, diag_offset,
            HAS_ROW=row is not None, HAS_COL=col is not None, EXCLUDE=exclude_diag, NEED_DY=need_dy,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **_flags(x),
        )  # fmt: skip
    return dx.to(x.dtype), None if dy is None else dy.to(y.dtype)
