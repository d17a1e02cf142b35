"""Differentiable losses on the block contract: one process, one block, any ``impl``.

:func:`block_lse` is the autograd primitive (row/column log-sum-exp of ``θ·x@y.T``, gradients
for ``x``, ``y`` and ``θ`` via ``block_grads`` with ``b = lse``; no ``dy`` work when ``y`` needs no
gradient). :func:`clip_loss` and :func:`fastclip_surrogate` are built on it; the diagonal terms are
O(B·d) plain autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dispatch import block_grads, block_stats


def _theta_grad(grad: Tensor, mom: Tensor, theta: Tensor) -> Tensor:
    """``d lse_i/d theta_i = mom_i``; summed when ``theta`` is broadcast."""
    g = grad * mom
    return (g.sum() if theta.numel() == 1 else g).reshape(theta.shape).to(theta.dtype)


class _BlockLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, theta_row, theta_col, diag_offset, exclude_diag, impl):
        st = block_stats(x, y, theta_row, theta_col, diag_offset, exclude_diag, impl=impl)
        ctx.save_for_backward(x, y, theta_row, theta_col, *st)
        ctx.opts = (diag_offset, exclude_diag, impl)
        return st.lse_row, st.lse_col

    @staticmethod
    def backward(ctx, g_row, g_col):
        x, y, theta_row, theta_col, lse_r, mom_r, lse_c, mom_c = ctx.saved_tensors
        row = None if g_row is None else (theta_row.detach(), lse_r, g_row)
        col = None if g_col is None or theta_col is None else (theta_col.detach(), lse_c, g_col)
        dx, dy = block_grads(x, y, row, col, *ctx.opts[:2], impl=ctx.opts[2], need_dy=ctx.needs_input_grad[1])
        dth_r = None if row is None or not ctx.needs_input_grad[2] else _theta_grad(g_row, mom_r, theta_row)
        dth_c = None if col is None or not ctx.needs_input_grad[3] else _theta_grad(g_col, mom_c, theta_col)
        return dx, dy, dth_r, dth_c, None, None, None


def block_lse(
    x: Tensor,
    y: Tensor,
    theta_row: Tensor,
    theta_col: Tensor | None = None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
    impl: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Differentiable ``(lse_row, lse_col)`` of ``block_stats`` (``lse_col`` is None without ``theta_col``)."""
    return _BlockLSE.apply(x, y, theta_row, theta_col, diag_offset, exclude_diag, impl)


def _pair(image: Tensor, text: Tensor) -> Tensor:
    """Row-wise ``<image_i, text_i>`` in the statistics dtype."""
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"image and text features must both be [B, d], got {tuple(image.shape)}, {tuple(text.shape)}")
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    return (image.to(dt) * text.to(dt)).sum(-1)


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, impl: str = "auto") -> Tensor:
    """OpenCLIP's symmetric cross-entropy on one process: ½(CE(θ·I@Tᵀ) + CE(θ·T@Iᵀ)), θ = ``logit_scale``.

    ``logit_scale`` is the multiplier itself (OpenCLIP passes ``logit_scale.exp()``), 1 element.
    """
    diag = _pair(image, text)
    theta = logit_scale.reshape(1)
    lse_row, lse_col = block_lse(image, text, theta, theta, impl=impl)
    return 0.5 * (lse_row.mean() + lse_col.mean()) - (theta.to(diag.dtype) * diag).mean()


class _FastClipSurrogate(torch.autograd.Function):
    """The FastCLIP surrogate through the kernel calls ``FastClipLoss`` makes: row-only ``block_stats`` of
    ``S = x@tᵀ`` and of ``Sᵀ`` (exclude_diag), and in backward one ``block_grads(need_dy=False)`` per side,
    each with its own anchors as rows and the other side's anchors as columns."""

    @staticmethod
    def forward(ctx, x, t, theta, log_w1, log_w2, impl):
        spos = _pair(x, t)
        th = theta.to(spos.dtype)
        terms, b, mom = [], [], []
        for a, c, log_w in ((x, t, log_w1), (t, x, log_w2)):
            st = block_stats(a, c, theta, None, 0, True, impl=impl)
            b.append(th * spos + log_w)
            terms.append(torch.exp(st.lse_row.to(spos.dtype) - b[-1]))  # g_i / (ε + u_i)
            mom.append(st.mom_row.to(spos.dtype))
        ctx.save_for_backward(x, t, theta, spos, *b, *terms, *mom)
        ctx.impl = impl
        return 0.5 * (terms[0] + terms[1]).mean()

    @staticmethod
    def backward(ctx, grad):
        x, t, theta, spos, b1, b2, r1, r2, m1, m2 = ctx.saved_tensors
        k = (grad * 0.5 / x.shape[0]).to(spos.dtype).expand(x.shape[0])
        th = theta.detach()
        img, txt = (th, b1, k), (th, b2, k)
        dx = block_grads(x, t, img, txt, 0, True, impl=ctx.impl, need_dy=False)[0]
        dt = block_grads(t, x, txt, img, 0, True, impl=ctx.impl, need_dy=False)[0]
        diag = -(th.to(spos.dtype) * k * (r1 + r2))[:, None]  # b depends on x, t through θ·<x_i, t_i>
        dx = dx + (diag * t.to(spos.dtype)).to(x.dtype)
        dt = dt + (diag * x.to(spos.dtype)).to(t.dtype)
        dth = (k * (r1 * (m1 - spos) + r2 * (m2 - spos))).sum().reshape(theta.shape).to(theta.dtype)
        return dx, dt, dth, None, None, None


def fastclip_surrogate(
    image: Tensor,
    text: Tensor,
    log_u1: Tensor,
    log_u2: Tensor,
    tau: Tensor,
    eps: float,
    impl: str = "auto",
) -> Tensor:
    """Single-process FastCLIP GCL surrogate ``mean_i ½[g1_i/(ε+u1_i) + g2_i/(ε+u2_i)]``, u held fixed.

    ``g1_i = 1/(B-1) Σ_{j≠i} exp((S_ij - S_ii)/τ)`` (image anchor i, rows of ``S = image @ textᵀ``),
    ``g2_i`` the same over column i (text anchor i). ``log_u*`` are ``log u`` per sample ([B]);
    ``tau`` is a 1-element tensor and receives a gradient. Each term is evaluated as
    ``exp(lse_i - S_ii/τ - log(B-1) - log(ε+u_i))``, never forming an unbounded exponential. The kernels
    are called as the training loss (``fastclip_ds.losses.fastclip``) calls them: 2 + 4 GEMM-equivalents.
    """
    b = image.shape[0]
    if b < 2:
        raise ValueError(f"fastclip_surrogate needs a batch of at least 2, got {b}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"image and text features must both be [B, d], got {tuple(image.shape)}, {tuple(text.shape)}")
    dt = torch.float64 if image.dtype == torch.float64 else torch.float32
    log_eps = torch.tensor(math.log(eps) if eps > 0 else float("-inf"), dtype=dt)
    log_w = [torch.logaddexp(u.detach().to(dt), log_eps) + math.log(b - 1) for u in (log_u1, log_u2)]
    return _FastClipSurrogate.apply(image, text, 1.0 / tau.reshape(1), *log_w, impl)
