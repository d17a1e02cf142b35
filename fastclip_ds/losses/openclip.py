"""OpenCLIP's contrastive loss with local rows and gathered features (``ClipLoss(local_loss=True,
gather_with_grad=True)``), written on the block kernels.

Rank ``r`` holds image rows ``x`` and text rows ``t`` (``[B, d]``, global rows ``r*B + i``). With ``θ = exp(λ)``
(``λ = logit_scale``) and ``X, T`` the features gathered WITH autograd (one all-gather of ``[x | t]``; its
backward reduce-scatters the gradient of ``[X | T]`` back to the owners):

    loss_r = ½ [ mean_i (lse_j θ x_i·T_j − θ x_i·t_i) + mean_i (lse_j θ t_i·X_j − θ x_i·t_i) ]

i.e. the mean of the image→text and text→image cross-entropies of the local rows against all ``K*B``
columns. Each rank's gradient (its own rows plus what the other ranks' rows send back through the
reduce-scatter) is ``K`` times its share of the global mean loss; DeepSpeed's average over ranks makes it
exact. The row log-sum-exp is an autograd function: forward ``block_stats`` (no ``B x KB`` tensor kept),
backward one ``block_grads`` with ``a = dlse, b = lse`` and ``d lse_i / dθ = mom_i``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import comm
from .base import ContrastiveLoss, block_grads, block_stats


class _RowLse(torch.autograd.Function):
    """``lse_i = log sum_j exp(θ x_i·y_j)`` over all columns (positives included)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, theta: Tensor, impl: str) -> Tensor:
        stats = block_stats(x, y, theta, None, 0, False, impl)
        ctx.save_for_backward(x, y, theta, stats.lse_row, stats.mom_row)
        ctx.impl = impl
        return stats.lse_row

    @staticmethod
    def backward(ctx, dlse: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, y, theta, lse, mom = ctx.saved_tensors
        dx, dy = block_grads(x, y, (theta, lse, dlse), None, 0, False, ctx.impl)
        dtheta = (dlse * mom).sum().reshape(theta.shape).to(theta.dtype) if ctx.needs_input_grad[2] else None
        return dx, dy, dtheta, None


class OpenClipLoss(ContrastiveLoss):
    """The OpenCLIP baseline (``loss.name = "openclip"``); ``logit_scale`` is trained."""

    trains_logit_scale = True

    def __init__(self, impl: str = "auto") -> None:
        super().__init__()
        self.impl = impl

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, keys: Tensor) -> dict:
        x, t = image_features, text_features
        d = x.shape[1]
        both = comm.gather_with_grad(torch.cat([x, t], dim=1), op="openclip_features")
        xs, ts = both[:, :d], both[:, d:]
        theta = logit_scale.float().exp() if x.dtype != torch.float64 else logit_scale.double().exp()
        lse_img = _RowLse.apply(x, ts, theta, self.impl)
        lse_txt = _RowLse.apply(t, xs, theta, self.impl)
        pos = theta * (x.to(lse_img.dtype) * t.to(lse_img.dtype)).sum(1)
        loss = 0.5 * ((lse_img - pos).mean() + (lse_txt - pos).mean())
        return {"loss": loss, "objective": loss.detach(), "tau": (1.0 / theta).detach().reshape(())}
