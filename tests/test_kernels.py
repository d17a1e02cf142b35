"""fastclip_kernels: chunked vs the float64 dense reference, impl dispatch, and the autograd losses.

The helpers at the top are shared with test_kernels_triton.py.
"""

from __future__ import annotations

import importlib.util
import math

import fastclip_kernels as fk
import pytest
import torch
from fastclip_kernels import chunked, reference
from torch import Tensor


def features(m: int, n: int, d: int, diag_offset: int = 0, dtype=torch.float64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Unit-norm ``x [m, d]``, ``y [n, d]`` whose positives ``(i, i + diag_offset)`` are correlated, as in CLIP."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=-1)
    y = torch.randn(n, d, generator=gen, dtype=torch.float64)
    rows = torch.arange(m)
    rows = rows[(rows + diag_offset >= 0) & (rows + diag_offset < n)]
    y[rows + diag_offset] = 2.0 * x[rows] + 0.1 * y[rows + diag_offset]
    return x.to(dtype), torch.nn.functional.normalize(y, dim=-1).to(dtype)


def make_theta(kind: str, length: int, value: float = 20.0, seed: int = 1) -> Tensor:
    """A broadcast 1-element θ (``scalar``) or one θ per row/column in ``[value/2, value]`` (``per``)."""
    if kind == "scalar":
        return torch.tensor([value], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return value * (0.5 + 0.5 * torch.rand(length, generator=gen, dtype=torch.float64))


def max_err(got: Tensor, want: Tensor) -> float:
    """Max abs difference; the non-finite entries (``-inf`` LSE of empty rows) must agree exactly."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), "non-finite entries differ"
    assert torch.equal(got[~finite], want[~finite]), "non-finite values differ"
    return (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0


def grad_coeffs(m: int, n: int, th_r: Tensor, th_c: Tensor, st, kind: str, seed: int = 2):
    """``(row, col)`` coefficients for ``block_grads``: LSE backward (``b = lse``) or FastCLIP-like (``b`` shifted)."""
    gen = torch.Generator().manual_seed(seed)
    a_r, a_c = torch.rand(m, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64)
    b_r, b_c = st.lse_row.double(), st.lse_col.double()
    if kind == "fastclip":  # weights exp(θS - b) above 1: b below the LSE
        b_r, b_c = b_r - 3.0, b_c - 3.0
    b_r, b_c = b_r.nan_to_num(neginf=0.0), b_c.nan_to_num(neginf=0.0)
    return (th_r, b_r, a_r), (th_c, b_c, a_c)


OFFSETS = [0, 9, -13, 200]  # 200: no positive pair inside the block


@pytest.mark.parametrize("theta_kind", ["scalar", "per"])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("offset", OFFSETS)
def test_chunked_stats_match_dense(offset: int, exclude: bool, theta_kind: str) -> None:
    x, y = features(37, 53, 24, offset)
    th_r, th_c = make_theta(theta_kind, 37), make_theta(theta_kind, 53, seed=3)
    want = reference.block_stats(x, y, th_r, th_c, offset, exclude)
    got = chunked.block_stats(x, y, th_r, th_c, offset, exclude, chunk=16)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float64
        assert max_err(g, w) < 1e-12
    row_only = chunked.block_stats(x, y, th_r, None, offset, exclude, chunk=16)
    assert row_only.lse_col is None and row_only.mom_col is None
    assert max_err(row_only.lse_row, want.lse_row) < 1e-12


@pytest.mark.parametrize("sides", ["row", "col", "both"])
@pytest.mark.parametrize("kind", ["lse", "fastclip"])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("offset", OFFSETS)
def test_chunked_grads_match_dense(offset: int, exclude: bool, kind: str, sides: str) -> None:
    x, y = features(37, 53, 24, offset)
    th_r, th_c = make_theta("per", 37), make_theta("scalar", 53)
    st = reference.block_stats(x, y, th_r, th_c, offset, exclude)
    row, col = grad_coeffs(37, 53, th_r, th_c, st, kind)
    row, col = (row if sides != "col" else None), (col if sides != "row" else None)
    want = reference.block_grads(x, y, row, col, offset, exclude)
    got = chunked.block_grads(x, y, row, col, offset, exclude, chunk=16)
    for g, w in zip(got, want, strict=True):
        assert max_err(g, w) < 1e-10 * w.abs().max().item()


@pytest.mark.parametrize("impl", ["dense", "chunked"])
@pytest.mark.parametrize("sides", ["row", "col", "both", "none"])
@pytest.mark.parametrize("exclude", [False, True])
def test_grads_without_dy(exclude: bool, sides: str, impl: str) -> None:
    """``need_dy=False``: the same ``dx`` (float64, bit for bit) and ``dy`` None; chunked over several tiles."""
    x, y = features(37, 53, 24, 9)
    th_r, th_c = make_theta("per", 37), make_theta("scalar", 53)
    row, col = grad_coeffs(37, 53, th_r, th_c, reference.block_stats(x, y, th_r, th_c, 9, exclude), "fastclip")
    row, col = (row if sides in ("row", "both") else None), (col if sides in ("col", "both") else None)
    opts = {"chunk": 16} if impl == "chunked" else {}
    grads = {"chunked": chunked, "dense": reference}[impl].block_grads
    dx, dy = grads(x, y, row, col, 9, exclude, **opts)
    dx_only, none = grads(x, y, row, col, 9, exclude, **opts, need_dy=False)
    assert none is None and dy is not None
    assert dx_only.dtype == torch.float64 and torch.equal(dx_only, dx)
    via_dispatch = fk.block_grads(x, y, row, col, 9, exclude, impl=impl, need_dy=False)  # chunked: one tile
    assert via_dispatch[1] is None and max_err(via_dispatch[0], dx) <= 1e-12 * max(1.0, dx.abs().max().item())


def test_block_lse_skips_dy_for_detached_columns(monkeypatch) -> None:
    """Columns that need no gradient (gathered candidates): ``block_grads`` runs with ``need_dy=False``."""
    calls = []
    real = fk.autograd.block_grads

    def spy(*args, **kwargs):
        calls.append(kwargs["need_dy"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fk.autograd, "block_grads", spy)
    x, y = features(6, 9, 5, 2)
    th = make_theta("scalar", 6, 3.0)
    grads = []
    for y_grad in (True, False):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_(y_grad)
        fk.block_lse(a, b, th, th, 2, True, impl="chunked")[0].sum().backward()
        assert (b.grad is not None) == y_grad
        grads.append(a.grad)
    assert calls == [True, False]
    assert torch.equal(grads[0], grads[1])


def test_chunked_no_sides_gives_zero_grads() -> None:
    x, y = features(5, 7, 4)
    dx, dy = chunked.block_grads(x, y, None, None)
    assert dx.shape == x.shape and dy.shape == y.shape and not dx.any() and not dy.any()


def test_chunked_empty_rows_and_columns() -> None:
    """1×1 with the pair excluded: nothing admissible, LSE -inf, mean 0, zero (not NaN) gradients."""
    x, y = features(1, 1, 8)
    th = torch.tensor([10.0], dtype=torch.float64)
    st = chunked.block_stats(x, y, th, th, exclude_diag=True)
    assert st.lse_row.item() == st.lse_col.item() == float("-inf")
    assert st.mom_row.item() == st.mom_col.item() == 0.0
    one = torch.ones(1, dtype=torch.float64)
    dx, dy = chunked.block_grads(x, y, (th, st.lse_row, one), (th, st.lse_col, one), exclude_diag=True)
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dy, torch.zeros_like(dy))


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_chunk_sizes(chunk: int | None) -> None:
    x, y = features(20, 30, 8, -3)
    th = make_theta("per", 20)
    want = reference.block_stats(x, y, th, th[:1], -3, True)
    got = chunked.block_stats(x, y, th, th[:1], -3, True, chunk=chunk)
    assert max(max_err(g, w) for g, w in zip(got, want, strict=True)) < 1e-12


def test_chunked_rejects_bad_chunk() -> None:
    x, y = features(4, 4, 4)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked.block_stats(x, y, torch.ones(1), chunk=0)


def test_tau_001_float32_is_stable() -> None:
    """θ = 100 (τ = 0.01): exp(θS) overflows float32, the log-space statistics and gradients do not."""
    x64, y64 = features(96, 160, 48, 5)
    th = torch.tensor([100.0], dtype=torch.float64)
    want = reference.block_stats(x64, y64, th, th, 5, True)
    x, y = x64.float(), y64.float()
    assert torch.isinf(torch.exp(100.0 * (x @ y.T))).any()
    got = chunked.block_stats(x, y, th, th, 5, True, chunk=48)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        assert max_err(g, w) < 2e-4 * max(1.0, w.abs().max().item())
    row, col = grad_coeffs(96, 160, th, th, want, "lse")
    want_g = reference.block_grads(x64, y64, row, col, 5, True)
    got_g = chunked.block_grads(x, y, row, col, 5, True, chunk=48)
    for g, w in zip(got_g, want_g, strict=True):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert max_err(g, w) < 1e-4 * w.abs().max().item()


def test_chunked_bfloat16_inputs() -> None:
    """16-bit inputs: float32 statistics, gradients in the input dtype, close to float64 on the rounded inputs."""
    x, y = features(40, 50, 32, dtype=torch.bfloat16)
    th = torch.tensor([30.0])
    st = chunked.block_stats(x, y, th, th, chunk=16)
    want = reference.block_stats(x.double(), y.double(), th, th)
    assert st.lse_row.dtype == torch.float32
    assert max(max_err(g, w) for g, w in zip(st, want, strict=True)) < 1e-4
    row, col = grad_coeffs(40, 50, th, th, want, "lse")
    dx, dy = chunked.block_grads(x, y, row, col, chunk=16)
    want_dx, want_dy = reference.block_grads(x.double(), y.double(), row, col)
    assert dx.dtype == dy.dtype == torch.bfloat16
    assert max_err(dx, want_dx) < 1e-2 * want_dx.abs().max().item()
    assert max_err(dy, want_dy) < 1e-2 * want_dy.abs().max().item()


def test_dispatch() -> None:
    x, y = features(6, 6, 4)
    assert fk.resolve_impl("auto", x) == "chunked"
    assert fk.resolve_impl("dense", x) == "dense"
    with pytest.raises(ValueError, match="impl must be one of"):
        fk.block_stats(x, y, torch.ones(1), impl="cuda")
    th = torch.tensor([5.0], dtype=torch.float64)
    for impl in ("auto", "chunked", "dense"):
        st = fk.block_stats(x, y, th, th, 1, True, impl=impl)
        assert max_err(st.lse_col, reference.block_stats(x, y, th, th, 1, True).lse_col) < 1e-12


@pytest.mark.parametrize("exclude", [False, True])
def test_block_lse_gradcheck(exclude: bool) -> None:
    """The autograd Function (x, y, per-row θ, broadcast θ) against finite differences, float64."""
    x, y = features(6, 9, 5, 2)
    th_r, th_c = make_theta("per", 6, 3.0), make_theta("scalar", 9, 4.0)
    inputs = [t.clone().requires_grad_() for t in (x, y, th_r, th_c)]

    def f(a, b, tr, tc):
        lse_r, lse_c = fk.block_lse(a, b, tr, tc, 2, exclude, impl="chunked")
        return lse_r, lse_c

    assert torch.autograd.gradcheck(f, inputs)


def _dense_clip(image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0])
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, labels) + ce(logits.T, labels))


@pytest.mark.parametrize("impl", ["chunked", "dense"])
def test_clip_loss_matches_cross_entropy(impl: str) -> None:
    x, y = features(48, 48, 16)
    scale = torch.tensor([30.0], dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, y, scale)]
    ref = [t.clone().requires_grad_() for t in (x, y, scale)]
    loss = fk.clip_loss(*ours, impl=impl)
    want = _dense_clip(*ref)
    loss.backward()
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-12
    for a, b in zip(ours, ref, strict=True):
        assert max_err(a.grad, b.grad) < 1e-12


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip not installed")
def test_clip_loss_matches_open_clip() -> None:
    """The peer used by the benchmark: open_clip's ClipLoss, float32, same value and gradients."""
    from fastclip_ds.compat import import_open_clip

    open_clip = import_open_clip()
    x, y = features(64, 64, 32, dtype=torch.float32)
    scale = torch.tensor([1.0 / 0.07])
    ours = [t.clone().requires_grad_() for t in (x, y, scale)]
    ref = [t.clone().requires_grad_() for t in (x, y, scale)]
    loss = fk.clip_loss(*ours, impl="chunked")
    want = open_clip.ClipLoss()(*ref)
    loss.backward()
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5
    for a, b in zip(ours, ref, strict=True):
        assert max_err(a.grad, b.grad) < 1e-5 * max(1.0, b.grad.abs().max().item())


def _dense_fastclip(image, text, log_u1, log_u2, tau, eps):
    s = image @ text.T
    diag = torch.diagonal(s)
    off = ~torch.eye(s.shape[0], dtype=torch.bool)
    b = s.shape[0]
    g1 = (torch.exp((s - diag[:, None]) / tau) * off).sum(1) / (b - 1)
    g2 = (torch.exp((s - diag[None, :]) / tau) * off).sum(0) / (b - 1)
    return (0.5 * (g1 / (eps + log_u1.exp()) + g2 / (eps + log_u2.exp()))).mean()


@pytest.mark.parametrize("impl", ["chunked", "dense"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_fastclip_surrogate_matches_direct(impl: str, eps: float) -> None:
    x, y = features(40, 40, 16)
    gen = torch.Generator().manual_seed(4)
    log_u1, log_u2 = torch.randn(40, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen).double()
    tau = torch.tensor([0.1], dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, y, tau)]
    ref = [t.clone().requires_grad_() for t in (x, y, tau)]
    loss = fk.fastclip_surrogate(ours[0], ours[1], log_u1, log_u2, ours[2], eps, impl=impl)
    want = _dense_fastclip(ref[0], ref[1], log_u1, log_u2, ref[2], eps)
    loss.backward()
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-12 * abs(want.item())
    for a, b in zip(ours, ref, strict=True):
        assert max_err(a.grad, b.grad) < 1e-10 * b.grad.abs().max().item()


def test_fastclip_surrogate_tau_001_float32() -> None:
    """τ = 0.01 with u ≈ g: every term ≈ 1 although exp((S_ij - S_ii)/τ) itself overflows float32."""
    x64, y64 = features(64, 64, 16)
    y64[3] = -x64[3]  # S_33 = -1: negatives exceed the positive by up to ~2, exp(200) overflows float32
    s = x64 @ y64.T
    off = ~torch.eye(64, dtype=torch.bool)
    rel = (s - torch.diagonal(s)[:, None]) / 0.01
    log_u1 = torch.logsumexp(rel.masked_fill(~off, -math.inf), 1) - math.log(63)
    log_u2 = torch.logsumexp((s - torch.diagonal(s)[None, :]).div(0.01).masked_fill(~off, -math.inf), 0) - math.log(63)
    assert torch.isinf(torch.exp(rel.float())).any()
    x, y = x64.float().requires_grad_(), y64.float().requires_grad_()
    tau = torch.tensor([0.01], requires_grad=True)
    loss = fk.fastclip_surrogate(x, y, log_u1, log_u2, tau, 0.0, impl="chunked")
    loss.backward()
    assert abs(loss.item() - 1.0) < 1e-4
    assert all(torch.isfinite(t.grad).all() for t in (x, y, tau))


def test_loss_input_errors() -> None:
    x, y = features(4, 5, 3)
    with pytest.raises(ValueError, match="both be"):
        fk.clip_loss(x, y, torch.ones(1))
    x, y = features(1, 1, 3)
    with pytest.raises(ValueError, match="at least 2"):
        fk.fastclip_surrogate(x, y, torch.zeros(1), torch.zeros(1), torch.ones(1), 0.0)
