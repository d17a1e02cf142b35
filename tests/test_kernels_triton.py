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
from fastclip_kernels import reference

from tests.test_kernels import features, grad_coeffs, make_theta, max_err

tb = fk.triton_module()
pytestmark = pytest.mark.skipif(tb is None, reason="triton does not import")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 5e-4}  # relative to the largest |value|
M, N, D = 96, 160, 48


def _inputs(m: int, n: int, d: int, offset: int, dtype: torch.dtype):
    """Inputs on the device in ``dtype``, and their float64 values (the rounded inputs, on CPU)."""
    x, y = features(m, n, d, offset)
    x, y = x.to(dtype), y.to(dtype)
    return x.to(DEVICE), y.to(DEVICE), x.double(), y.double()


def _check(got, same_dtype_ref, want, dtype: torch.dtype) -> None:
    scale = max(1.0, want.abs()[torch.isfinite(want)].max().item())
    assert max_err(got, want) <= 2 * max_err(same_dtype_ref, want) + FLOOR[dtype] * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("theta_kind", ["scalar", "per"])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("offset", [0, 40, -30, 500])
def test_triton_stats(offset: int, exclude: bool, theta_kind: str, dtype: torch.dtype) -> None:
    x, y, x64, y64 = _inputs(M, N, D, offset, dtype)
    th_r, th_c = make_theta(theta_kind, M, 50.0), make_theta(theta_kind, N, 50.0, seed=5)
    want = reference.block_stats(x64, y64, th_r, th_c, offset, exclude)
    same = reference.block_stats(x, y, th_r.to(DEVICE), th_c.to(DEVICE), offset, exclude)
    got = fk.block_stats(x, y, th_r.to(DEVICE), th_c.to(DEVICE), offset, exclude, impl="triton")
    for g, s, w in zip(got, same, want, strict=True):
        assert g.dtype == torch.float32 and g.device.type == DEVICE
        _check(g, s, w, dtype)
    row_only = fk.block_stats(x, y, th_r.to(DEVICE), None, offset, exclude, impl="triton")
    assert row_only.lse_col is None
    _check(row_only.lse_row, same.lse_row, want.lse_row, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sides", ["row", "col", "both"])
@pytest.mark.parametrize("kind", ["lse", "fastclip"])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("offset", [0, 40, -30])
def test_triton_grads(offset: int, exclude: bool, kind: str, sides: str, dtype: torch.dtype) -> None:
    x, y, x64, y64 = _inputs(M, N, D, offset, dtype)
    th_r, th_c = make_theta("per", M, 50.0), make_theta("scalar", N, 50.0)
    row, col = grad_coeffs(M, N, th_r, th_c, reference.block_stats(x64, y64, th_r, th_c, offset, exclude), kind)
    row, col = (row if sides != "col" else None), (col if sides != "row" else None)
    on_dev = [None if c is None else tuple(t.to(DEVICE) for t in c) for c in (row, col)]
    want = reference.block_grads(x64, y64, row, col, offset, exclude)
    same = reference.block_grads(x, y, *on_dev, offset, exclude)
    got = fk.block_grads(x, y, *on_dev, offset, exclude, impl="triton")
    for g, s, w, inp in zip(got, same, want, (x, y), strict=True):
        assert g.dtype == inp.dtype and g.shape == inp.shape
        _check(g, s, w, dtype)


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


def test_triton_feature_dim_over_several_k_chunks() -> None:
    """d = 150: three ragged K-chunks in both kernels."""
    x, y, x64, y64 = _inputs(70, 90, 150, 3, torch.float32)
    th = torch.tensor([20.0], dtype=torch.float64)
    want = reference.block_stats(x64, y64, th, th, 3, True)
    got = fk.block_stats(x, y, th.to(DEVICE), th.to(DEVICE), 3, True, impl="triton")
    for g, w in zip(got, want, strict=True):
        assert max_err(g, w) < 1e-5 * max(1.0, w.abs().max().item())
    row, col = grad_coeffs(70, 90, th, th, want, "lse")
    on_dev = [tuple(t.to(DEVICE) for t in c) for c in (row, col)]
    for g, w in zip(
        fk.block_grads(x, y, *on_dev, 3, True, impl="triton"),
        reference.block_grads(x64, y64, row, col, 3, True),
        strict=True,
    ):
        assert max_err(g, w) < 1e-5 * w.abs().max().item()


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
    x, y, x64, y64 = _inputs(M, M, D, 0, torch.float32)
    log_u = torch.randn(2, M, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
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
def test_auto_picks_triton_on_cuda() -> None:
    assert fk.resolve_impl("auto", torch.ones(1, device="cuda")) == "triton"
