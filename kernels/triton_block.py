"""The block contract (see ``reference``) as Triton kernels: ``S`` exists only tile by tile, on chip.

Forward (1 GEMM-equivalent, ``_stats_kernel``): one program per row block walks all column
blocks and keeps the row log-sum-exp and softmax-mean online in base 2 (``exp2`` with log2(e)
folded into θ). The same tile gives each column's partial statistics over the program's rows;
they go to a ``[cdiv(M, BLOCK_M), N]`` float32 buffer pair merged by a log-sum-exp over that
small axis on the host: one pass, deterministic, no atomics (a lock-free merge of column LSEs
would need a fixed shift, which underflows at τ = 0.01).

Backward (4 GEMM-equivalents; 2 with ``need_dy=False``), FlashAttention-2's split: ``_pass_kernel``
runs twice with the roles of the sides swapped. A program owns a block of anchor rows, walks every
candidate tile, recomputes the ``S`` tile, forms ``G`` and accumulates ``G @ candidates`` in
registers; it writes its rows of the gradient once. Pass 1 (anchors ``x``) gives ``dx``, pass 2
(anchors ``y``, ``Sᵀ``, row and column coefficients swapped, diagonal offset negated) gives
``dy``. No global read-modify-write, no atomics. With ``d`` padded to a power of two ≤ 512 the
anchor block ``[BLOCK_M, d]`` stays on chip and each candidate tile is loaded once per visit
(for ``S`` and for the product); above that the accumulator is split over programs along ``d``
and ``S`` is rebuilt by a K-loop in each. The loops' loads are software-pipelined by Triton
(``num_stages``). Block sizes: ``schedule.config``.

Dots per input dtype (``_flags``): bfloat16 runs native 16-bit dots with ``G`` rounded to bfloat16;
float16 casts operands to float32 (exact in TF32) and multiplies as TF32 with ``G`` rounded to
nearest TF32 first (``_round_tf32``: the hardware would truncate it), which keeps FastCLIP weights
above 65504 finite; float32 multiplies in IEEE fp32. Under ``TRITON_INTERPRET=1`` every dot is
IEEE fp32 (the interpreter multiplies bfloat16 bit patterns) and the GPU's rounding of ``G`` is
emulated (``G_ROUND``), so the interpreter computes what the GPU computes up to summation order.
Kernels launch on the inputs' device.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import schedule
from .reference import BlockStats

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.0 / math.log(2.0)
SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET_ARCH = 90  # the GPU whose block sizes the interpreter runs when no arch is given
G_NONE, G_BF16, G_TF32 = 0, 1, 2


@triton.jit
def _load_rows(ptr, rows, ks, R, D, TO_F32: tl.constexpr):
    """``ptr[rows, ks]`` of a row-major ``[R, D]`` matrix (out of range reads 0), float32 if ``TO_F32``."""
    t = tl.load(ptr + rows[:, None] * D + ks[None, :], mask=(rows[:, None] < R) & (ks[None, :] < D), other=0.0)
    if TO_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _s_held(a_blk, b_ptr, cols, N, D, BLOCK_K: tl.constexpr, TO_F32: tl.constexpr, PRECISION: tl.constexpr):
    """``(a_blk @ b[cols].T, b[cols])``: one dot against the held anchor block; the candidate tile is reused."""
    b_t = _load_rows(b_ptr, cols, tl.arange(0, BLOCK_K), N, D, TO_F32)
    return tl.dot(a_blk, tl.trans(b_t), input_precision=PRECISION), b_t


@triton.jit
def _s_loop(a_ptr, b_ptr, rows, cols, M, N, D, BLOCK_K: tl.constexpr, TO_F32: tl.constexpr,
            PRECISION: tl.constexpr):  # fmt: skip
    """``a[rows] @ b[cols].T`` in float32 by a K-loop over ``D``."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        acc = tl.dot(_load_rows(a_ptr, rows, ks, M, D, TO_F32), tl.trans(_load_rows(b_ptr, cols, ks, N, D, TO_F32)),
                     acc, input_precision=PRECISION)  # fmt: skip
    return acc


@triton.jit
def _admissible(rows, cols, M, N, diag_offset, exclude):
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    return ok & ((cols[None, :] != rows[:, None] + diag_offset) | (exclude == 0))


@triton.jit
def _finish(shift, total, weighted):
    """Natural-log LSE and softmax-mean from a base-2 shift, sum of exp2 and weighted sum (empty: -inf, 0)."""
    nonempty = total > 0.0
    safe = tl.where(nonempty, total, 1.0)
    lse = tl.where(nonempty, (shift + tl.log2(safe)) * 0.6931471805599453, float("-inf"))  # ln(2)
    return lse, tl.where(nonempty, weighted / safe, 0.0)


@triton.jit
def _rne_bf16(v):
    """float32 ``v`` rounded to the nearest bfloat16 (ties to even), as float32: the GPU's ``cvt.rn.bf16.f32``
    (the interpreter's own cast truncates)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_g(g, dtype, TO_F32: tl.constexpr, G_ROUND: tl.constexpr):
    """``G`` as the second dot's operand: the input dtype for 16-bit dots, else float32 rounded as the GPU does."""
    if not TO_F32:
        out = g.to(dtype)
    elif G_ROUND == 1:  # the interpreter emulating the GPU's bfloat16 G
        out = _rne_bf16(g)
    elif G_ROUND == 2:  # round to nearest TF32 (ties away, as cvt.rna.tf32.f32); the tensor core then truncates nothing
        bits = (g.to(tl.int32, bitcast=True) + 0x1000) & -8192  # -8192 = 0xFFFFE000: keep 10 mantissa bits
        out = bits.to(tl.float32, bitcast=True)
    else:
        out = g
    return out


@triton.jit
def _stats_kernel(
    x_ptr, y_ptr, th_r_ptr, th_c_ptr, lse_r_ptr, mom_r_ptr, lse_cp_ptr, mom_cp_ptr, M, N, D, diag_offset, exclude,
    HAS_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HOLD: tl.constexpr,
    TO_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    if HOLD:
        x_blk = _load_rows(x_ptr, rows, tl.arange(0, BLOCK_K), M, D, TO_F32)
    th_r = tl.load(th_r_ptr + rows, mask=rows < M, other=0.0) * 1.4426950408889634  # log2(e)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        if HOLD:
            s, _ = _s_held(x_blk, y_ptr, cols, N, D, BLOCK_K, TO_F32, PRECISION)
        else:
            s = _s_loop(x_ptr, y_ptr, rows, cols, M, N, D, BLOCK_K, TO_F32, PRECISION)
        ok = _admissible(rows, cols, M, N, diag_offset, exclude)
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
            lse_c, mom_c = _finish(cshift, tl.sum(q, 0), tl.sum(q * s, 0))
            tl.store(lse_cp_ptr + pid * N + cols, lse_c, mask=cols < N)
            tl.store(mom_cp_ptr + pid * N + cols, mom_c, mask=cols < N)
    lse, mom = _finish(tl.where(m_i == float("-inf"), 0.0, m_i), l_i, acc_i)
    tl.store(lse_r_ptr + rows, lse, mask=rows < M)
    tl.store(mom_r_ptr + rows, mom, mask=rows < M)


@triton.jit
def _pass_kernel(
    a_ptr, b_ptr, th_a_ptr, bb_a_ptr, c_a_ptr, th_b_ptr, bb_b_ptr, c_b_ptr, out_ptr, M, N, D, diag_offset, exclude,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, HOLD: tl.constexpr, TO_F32: tl.constexpr, PRECISION: tl.constexpr, G_ROUND: tl.constexpr,
):  # fmt: skip
    """``out[rows, dslice] = (G @ b)[rows, dslice]`` for anchors ``a [M, D]`` and candidates ``b [N, D]``.

    ``G_ij = c_a[i]·exp2(th_a[i]·S_ij − bb_a[i]) + c_b[j]·exp2(th_b[j]·S_ij − bb_b[j])`` (0 off the admissible
    set), ``S = a @ b.T``; ``th``/``bb`` arrive pre-multiplied by log2(e), ``c`` = coefficient·θ.
    """
    pid, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < M
    if HOLD:
        a_blk = _load_rows(a_ptr, rows, tl.arange(0, BLOCK_K), M, D, TO_F32)
    if HAS_A:
        th_a = tl.load(th_a_ptr + rows, mask=rmask, other=0.0)
        bb_a = tl.load(bb_a_ptr + rows, mask=rmask, other=0.0)
        c_a = tl.load(c_a_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        if HOLD:
            s, b_t = _s_held(a_blk, b_ptr, cols, N, D, BLOCK_K, TO_F32, PRECISION)
        else:
            s = _s_loop(a_ptr, b_ptr, rows, cols, M, N, D, BLOCK_K, TO_F32, PRECISION)
            b_t = _load_rows(b_ptr, cols, dcols, N, D, TO_F32)
        g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_A:
            g += c_a[:, None] * tl.exp2(s * th_a[:, None] - bb_a[:, None])
        if HAS_B:
            th_b = tl.load(th_b_ptr + cols, mask=cmask, other=0.0)
            bb_b = tl.load(bb_b_ptr + cols, mask=cmask, other=0.0)
            c_b = tl.load(c_b_ptr + cols, mask=cmask, other=0.0)
            g += c_b[None, :] * tl.exp2(s * th_b[None, :] - bb_b[None, :])
        g = tl.where(_admissible(rows, cols, M, N, diag_offset, exclude), g, 0.0)
        acc = tl.dot(_round_g(g, a_ptr.dtype.element_ty, TO_F32, G_ROUND), b_t, acc, input_precision=PRECISION)
    if G_ROUND == 1 and TO_F32:  # interpreter, bfloat16 output: round to nearest before its truncating cast
        acc = _rne_bf16(acc)
    omask = rmask[:, None] & (dcols[None, :] < D)
    tl.store(out_ptr + rows[:, None] * D + dcols[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def flags(dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """``tl.dot`` operand handling per input dtype (see the module docstring)."""
    g_round = {torch.bfloat16: G_BF16, torch.float16: G_TF32}.get(dtype, G_NONE)
    if interpret or dtype == torch.float32:
        return {"TO_F32": True, "PRECISION": "ieee", "G_ROUND": g_round}
    if dtype == torch.float16:
        return {"TO_F32": True, "PRECISION": "tf32", "G_ROUND": G_TF32}
    return {"TO_F32": False, "PRECISION": None, "G_ROUND": G_NONE}


def _arch(x: Tensor, arch: int | None) -> int:
    if arch is not None:
        return arch
    if x.is_cuda:
        major, minor = torch.cuda.get_device_capability(x.device)
        return 10 * major + minor
    return INTERPRET_ARCH


def launch_options(kind: str, x: Tensor, arch: int | None) -> tuple[schedule.Config, dict]:
    """The block config for ``kind`` and the kernel's block/launch keyword arguments."""
    cfg = schedule.config(kind, dtype_name(x.dtype), _arch(x, arch), x.shape[1])
    kw = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "HOLD": cfg.hold}
    return cfg, {**kw, "num_warps": cfg.warps, "num_stages": cfg.stages}


def _on_device(x: Tensor) -> contextlib.AbstractContextManager:
    """Launch context: the inputs' CUDA device (Triton launches on the current one)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def block_stats(
    x: Tensor,
    y: Tensor,
    theta_row: Tensor,
    theta_col: Tensor | None = None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
    *,
    arch: int | None = None,
) -> BlockStats:
    """Triton ``reference.block_stats`` (float32 statistics); ``arch`` picks the block sizes (default: x's GPU)."""
    x, y = _prepare(x, y)
    (m, d), n = x.shape, y.shape[0]
    cfg, kw = launch_options("fwd", x, arch)
    grid = (triton.cdiv(m, cfg.block_m),)
    f32 = {"dtype": torch.float32, "device": x.device}
    lse_r, mom_r = torch.empty(m, **f32), torch.empty(m, **f32)
    has_col = theta_col is not None
    th_c = _vec(theta_col, n, x.device) if has_col else lse_r
    lse_cp = torch.empty(grid[0], n, **f32) if has_col else lse_r
    mom_cp = torch.empty(grid[0], n, **f32) if has_col else lse_r
    fl = flags(x.dtype)
    del fl["G_ROUND"]
    with _on_device(x):
        _stats_kernel[grid](
            x, y, _vec(theta_row, m, x.device), th_c, lse_r, mom_r, lse_cp, mom_cp, m, n, d, diag_offset,
            int(exclude_diag), HAS_COL=has_col, **kw, **fl,
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


def _grad_pass(a: Tensor, b: Tensor, own, other, diag_offset: int, exclude: bool, arch: int | None) -> Tensor:
    """``G @ b`` with anchors ``a`` (``own`` coefficients) against candidates ``b`` (``other``)."""
    (m, d), n = a.shape, b.shape[0]
    out = torch.empty_like(a)
    cfg, kw = launch_options("bwd", a, arch)
    dummy = torch.empty(1, dtype=torch.float32, device=a.device)
    with _on_device(a):
        _pass_kernel[(triton.cdiv(m, cfg.block_m), cfg.d_split)](
            a, b, *_coeffs(own, m, dummy), *_coeffs(other, n, dummy), out, m, n, d, diag_offset, int(exclude),
            HAS_A=own is not None, HAS_B=other is not None, BLOCK_D=cfg.block_d, **kw, **flags(a.dtype),
        )  # fmt: skip
    return out


def block_grads(
    x: Tensor,
    y: Tensor,
    row: tuple[Tensor, Tensor, Tensor] | None,
    col: tuple[Tensor, Tensor, Tensor] | None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
    *,
    need_dy: bool = True,
    arch: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Triton ``reference.block_grads``: ``(dx, dy)`` in the input dtype (float32 accumulation).

    Two passes of ``_pass_kernel``: row blocks for ``dx``, then (unless ``need_dy=False``) column blocks for ``dy``.
    """
    x, y = _prepare(x, y)
    if row is None and col is None:
        return torch.zeros_like(x), torch.zeros_like(y) if need_dy else None
    dx = _grad_pass(x, y, row, col, diag_offset, exclude_diag, arch)
    dy = _grad_pass(y, x, col, row, -diag_offset, exclude_diag, arch) if need_dy else None
    return dx, dy
