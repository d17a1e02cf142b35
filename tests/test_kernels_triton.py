"""The Triton kernels against the float64 dense reference.

On CPU they run under the Triton interpreter (``fastclip_kernels.triton_module`` sets
``TRITON_INTERPRET=1`` before the kernels are decorated); with a GPU the same tests run on CUDA.
Tolerance (FlashAttention / CCE convention): the kernel's error against float64 may be at most
twice the error of the dense reference computed from the same inputs, plus a small floor.
"""

from __future__ import annotations

import fastclip_kernels as fk
import pytest
import torch
import triton
import triton.language as tl
from fastclip_kernels import reference
from torch import Tensor

from tests.test_kernels import features, grad_coeffs, make_theta, max_err

tb = fk.triton_module()
pytestmark = pytest.mark.skipif(tb is None, reason="triton does not import")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}  # relative to the largest |value|
# The GPU block sizes of sm_90 for every dtype and of sm_80 for bf16 (on CUDA: the device's own; arch is ignored).
CONFIGS = [(torch.float32, 90), (torch.bfloat16, 90), (torch.float16, 90), (torch.bfloat16, 80)]
# Several row and column blocks with ragged edges for every config (BLOCK_M ∈ {32, 64, 128}, BLOCK_N ∈ {16, 32, 64}).
M, N, D = 136, 100, 48


def _arch(arch: int) -> dict:
    return {"arch": arch} if DEVICE == "cpu" else {}


def _inputs(m: int, n: int, d: int, offset: int, dtype: torch.dtype):
    """Inputs on the device in ``dtype``, and their float64 values (the rounded inputs, on CPU)."""
    x, y = features(m, n, d, offset)
    x, y = x.to(dtype), y.to(dtype)
    return x.to(DEVICE), y.to(DEVICE), x.double(), y.double()


def _check(got, same_precision_ref, want, dtype: torch.dtype) -> None:
    """FlashAttention's convention: error against float64 at most twice that of a reference computed the way
    the GPU rounds, plus a small floor."""
    scale = max(1.0, want.abs()[torch.isfinite(want)].max().item())
    assert max_err(got, want) <= 2 * max_err(same_precision_ref, want) + FLOOR[dtype] * scale


def _round_like_gpu(g: Tensor, dtype: torch.dtype) -> Tensor:
    """``G`` as the GPU feeds it to the second product: bfloat16 for bf16 inputs, TF32 rounded to nearest
    (ties away) for fp16 inputs, float32 otherwise."""
    if dtype == torch.bfloat16:
        return g.float().to(torch.bfloat16).double()
    bits = g.float().view(torch.int32)
    if dtype == torch.float16:
        bits = (bits + 0x1000) & -8192
    return bits.view(torch.float32).double()


def gpu_rounded_grads(x, y, row, col, offset: int, exclude: bool, dtype: torch.dtype):
    """``(G @ y, G.T @ x)`` in float64 from rounded ``G`` (derived here from the contract, not from ``reference``),
    outputs rounded to ``dtype``."""
    s = x @ y.T
    g = torch.zeros_like(s)
    for side, along in ((row, 1), (col, 0)):
        if side is not None:
            th, b, a = (t.double().expand(s.shape[1 - along]) for t in side)
            th, b, a = (v[:, None] if along == 1 else v[None, :] for v in (th, b, a))
            g = g + a * th * torch.exp(th * s - b)
    if exclude:
        g = g.masked_fill(reference.positive_mask(*s.shape, offset, s.device), 0.0)
    g = _round_like_gpu(g, dtype)
    return (g @ y).float().to(dtype), (g.T @ x).float().to(dtype)


def _same_precision(x, y, x64, y64, on_dev, row, col, offset: int, exclude: bool):
    """The reference the tolerance is built on: float32 inputs run the dense reference in float32 (its ``S``
    error, amplified by θ, is the kernel's); 16-bit inputs the float64 computation with the GPU's rounding."""
    if x.dtype == torch.float32:
        return reference.block_grads(x, y, *on_dev, offset, exclude)
    return gpu_rounded_grads(x64, y64, row, col, offset, exclude, x.dtype)


STATS_CASES = [(0, False, "scalar"), (40, True, "per"), (-30, True, "scalar"), (500, True, "per")]


@pytest.mark.parametrize(("dtype", "arch"), CONFIGS)
@pytest.mark.parametrize(("offset", "exclude", "theta_kind"), STATS_CASES)
def test_triton_stats(offset: int, exclude: bool, theta_kind: str, dtype: torch.dtype, arch: int) -> None:
    """Row and column statistics over several row blocks (the column LSE merged across programs), ragged edges."""
    x, y, x64, y64 = _inputs(M, N, D, offset, dtype)
    th_r, th_c = make_theta(theta_kind, M, 50.0), make_theta(theta_kind, N, 50.0, seed=5)
    want = reference.block_stats(x64, y64, th_r, th_c, offset, exclude)
    same = reference.block_stats(x, y, th_r.to(DEVICE), th_c.to(DEVICE), offset, exclude)
    got = tb.block_stats(x, y, th_r.to(DEVICE), th_c.to(DEVICE), offset, exclude, **_arch(arch))
    for g, s, w in zip(got, same, want, strict=True):
        assert g.dtype == torch.float32 and g.device.type == DEVICE
        _check(g, s, w, dtype)
    row_only = tb.block_stats(x, y, th_r.to(DEVICE), None, offset, exclude, **_arch(arch))
    assert row_only.lse_col is None
    _check(row_only.lse_row, same.lse_row, want.lse_row, dtype)


GRAD_CASES = [("row", "lse", 0, False), ("col", "fastclip", -30, True), ("both", "fastclip", 40, True)]


@pytest.mark.parametrize(("dtype", "arch"), CONFIGS)
@pytest.mark.parametrize(("sides", "kind", "offset", "exclude"), GRAD_CASES)
def test_triton_grads(sides: str, kind: str, offset: int, exclude: bool, dtype: torch.dtype, arch: int) -> None:
    """Both passes of the split backward (several row and column blocks, ragged) against float64, with the
    tolerance from a float64 computation that rounds ``G`` and the outputs as the GPU does."""
    x, y, x64, y64 = _inputs(M, N, D, offset, dtype)
    th_r, th_c = make_theta("per", M, 50.0), make_theta("scalar", N, 50.0)
    row, col = grad_coeffs(M, N, th_r, th_c, reference.block_stats(x64, y64, th_r, th_c, offset, exclude), kind)
    row, col = (row if sides != "col" else None), (col if sides != "row" else None)
    on_dev = [None if c is None else tuple(t.to(DEVICE) for t in c) for c in (row, col)]
    want = reference.block_grads(x64, y64, row, col, offset, exclude)
    same = _same_precision(x, y, x64, y64, on_dev, row, col, offset, exclude)
    got = tb.block_grads(x, y, *on_dev, offset, exclude, **_arch(arch))
    for g, s, w, inp in zip(got, same, want, (x, y), strict=True):
        assert g.dtype == inp.dtype and g.shape == inp.shape
        _check(g, s, w, dtype)


@triton.jit
def _round_kernel(v_ptr, out_ptr, n, G_ROUND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, tb._round_g(v, tl.float32, True, G_ROUND), mask=offs < n)


def _nearest(v: Tensor, bits: int, ties_away: bool) -> Tensor:
    """``v`` rounded to ``bits`` significant bits in float64 arithmetic (ties to even, or away from zero)."""
    m, e = torch.frexp(v.double())  # v = m·2^e, 0.5 <= |m| < 1
    scaled = m * 2.0**bits
    r = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5) if ties_away else torch.round(scaled)
    return torch.ldexp(r, e - bits)


@pytest.mark.parametrize(("g_round", "bits", "ties_away"), [(tb.G_BF16, 8, False), (tb.G_TF32, 11, True)])
def test_g_rounding_is_the_gpus(g_round: int, bits: int, ties_away: bool) -> None:
    """The rounding of ``G`` the kernels apply in float32 (the interpreter's emulation of the bf16 cast; fp16's
    TF32 operand) is round-to-nearest at the GPU's precision, ties as the GPU breaks them, not truncation."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(512, generator=gen) * torch.logspace(-20, 20, 512)
    base = _nearest(v[:64], bits, False)
    ties = base + torch.ldexp(torch.ones(64, dtype=torch.float64), torch.frexp(base)[1] - bits - 1)  # half-way
    v = torch.cat([v, ties.float()]).to(DEVICE)
    out = torch.empty_like(v)
    _round_kernel[(1,)](v, out, v.numel(), G_ROUND=g_round, BLOCK=1024)
    want = _nearest(v.cpu(), bits, ties_away).float()
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("sides", ["row", "col", "both"])
def test_triton_grads_without_dy(sides: str) -> None:
    """``need_dy=False`` (kernel compiled without the dy part): the same ``dx`` in float32, ``dy`` None."""
    x, y, x64, y64 = _inputs(M, N, D, 40, torch.float32)
    th_r, th_c = make_theta("per", M, 50.0), make_theta("scalar", N, 50.0)
    row, col = grad_coeffs(M, N, th_r, th_c, reference.block_stats(x64, y64, th_r, th_c, 40, True), "fastclip")
    row, col = (row if sides != "col" else None), (col if sides != "row" else None)
    on_dev = [None if c is None else tuple(t.to(DEVICE) for t in c) for c in (row, col)]
    dx, dy = fk.block_grads(x, y, *on_dev, 40, True, impl="triton")
    dx_only, none = fk.block_grads(x, y, *on_dev, 40, True, impl="triton", need_dy=False)
    assert none is None and dy is not None and dx_only.dtype == torch.float32
    assert max_err(dx_only, dx) <= 1e-6 * dx.abs().max().item()
    want = reference.block_grads(x64, y64, row, col, 40, True, need_dy=False)[0]
    _check(dx_only, reference.block_grads(x, y, *on_dev, 40, True)[0], want, torch.float32)


@pytest.mark.parametrize(("dtype", "d"), [(torch.float32, 150), (torch.bfloat16, 600)])
def test_triton_split_schedule(dtype: torch.dtype, d: int) -> None:
    """The split schedule (fp32 at any d, 16-bit above d = 512): the accumulator split over 2 (3) programs
    along d, ``S`` rebuilt by a ragged K-loop in each, two row blocks."""
    x, y, x64, y64 = _inputs(70, 40, d, 3, dtype)
    assert tb.launch_options("bwd", x, 90)[0].d_split > 1
    th = torch.tensor([20.0], dtype=torch.float64)
    want = reference.block_stats(x64, y64, th, th, 3, True)
    same = reference.block_stats(x, y, th.to(DEVICE), th.to(DEVICE), 3, True)
    for g, s, w in zip(
        tb.block_stats(x, y, th.to(DEVICE), th.to(DEVICE), 3, True, **_arch(90)), same, want, strict=True
    ):
        _check(g, s, w, dtype)
    row, col = grad_coeffs(70, 40, th, th, want, "lse")
    on_dev = [tuple(t.to(DEVICE) for t in c) for c in (row, col)]
    same = _same_precision(x, y, x64, y64, on_dev, row, col, 3, True)
    got = tb.block_grads(x, y, *on_dev, 3, True, **_arch(90))
    for g, s, w in zip(got, same, reference.block_grads(x64, y64, row, col, 3, True), strict=True):
        _check(g, s, w, dtype)


def test_triton_tau_001_and_empty_rows() -> None:
    """θ = 100 in float32 stays finite; a 1×1 block with its pair excluded gives -inf / 0 / zero grads."""
    x, y, x64, y64 = _inputs(M, N, D, 0, torch.float32)
    th = torch.tensor([100.0], dtype=torch.float64)
    want = reference.block_stats(x64, y64, th, th, 0, True)
    th = th.to(DEVICE)
    got = fk.block_stats(x, y, th, th, 0, True, impl="triton")
    for g, w in zip(got, want, strict=True):
        assert max_err(g, w) < 2e-4 * max(1.0, w.abs().max().item())
    x1, y1 = x[:1], y[:1]
    st = fk.block_stats(x1, y1, th, th, 0, True, impl="triton")
    assert st.lse_row.item() == st.lse_col.item() == float("-inf") and st.mom_row.item() == 0.0
    one = torch.ones(1, device=DEVICE)
    dx, dy = fk.block_grads(x1, y1, (th, st.lse_row, one), (th, st.lse_col, one), 0, True, impl="triton")
    assert not dx.any() and not dy.any()


def test_triton_losses_match_float64() -> None:
    """clip_loss and fastclip_surrogate end to end (values, feature and temperature gradients)."""
    x, y, x64, y64 = _inputs(N, N, D, 0, torch.float32)
    log_u = torch.randn(2, N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    cases = [
        (lambda a, b, t, impl: fk.clip_loss(a, b, t, impl=impl), torch.tensor([5.0])),
        (
            lambda a, b, t, impl: fk.fastclip_surrogate(
                a, b, log_u[0].to(a.device), log_u[1].to(a.device), t, 1e-6, impl=impl
            ),
            torch.tensor([0.5]),
        ),
    ]
    for loss_fn, t in cases:
        ours = [v.clone().requires_grad_() for v in (x, y, t.to(DEVICE))]
        ref = [v.clone().requires_grad_() for v in (x64, y64, t.double())]
        loss, want = loss_fn(*ours, "triton"), loss_fn(*ref, "dense")
        loss.backward()
        want.backward()
        assert abs(want.item()) > 0.1
        assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item())
        for a, b in zip(ours, ref, strict=True):
            assert max_err(a.grad, b.grad) < 1e-4 * b.grad.abs().max().item()


def test_triton_rejects_bad_inputs() -> None:
    x, y, x64, y64 = _inputs(8, 8, 16, 0, torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        fk.block_stats(x64, y64, torch.ones(1), impl="triton")
    with pytest.raises(ValueError, match="one dtype"):
        fk.block_stats(x, y.half(), torch.ones(1), impl="triton")
    with pytest.raises(ValueError, match=r"\[M, d\] and \[N, d\]"):
        fk.block_stats(x, y[:, :8], torch.ones(1), impl="triton")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_auto_on_cuda_follows_the_model() -> None:
    """bf16 (spill-free kernels, the model's pick) runs Triton; fp32 (spilling FMA kernels) the chunked path."""
    assert fk.resolve_impl("auto", torch.ones(8192, 512, device="cuda", dtype=torch.bfloat16)) == "triton"
    assert fk.resolve_impl("auto", torch.ones(8192, 512, device="cuda")) == "chunked"
