"""OpenCLIP's contrastive loss with local rows and gathered features (``ClipLoss(local_loss=True,
gather_with_grad=True)``), written on the block kernels.

Rank ``r`` holds image rows ``x`` and text rows ``t`` (``[B, d]``, global rows ``r*B + i``). With ``θ`` the
``logit_scale`` multiplier (what the model returns and ``ClipLoss`` takes) and ``X, T`` the features
gathered WITH autograd (one all-gather of ``[x | t]``; its backward reduce-scatters the gradient of ``[X | T]``
back to the owners):

    loss_r = ½ [ mean_i (lse_j θ x_i·T_j − θ x_i·t_i) + mean_i (lse_j θ t_i·X_j − θ x_i·t_i) ]

i.e. the mean of the image→text and text→image cross-entropies of the local rows against all ``K*B``
columns. Each rank's gradient (its own rows plus what the other ranks' rows send back through the
reduce-scatter) is ``K`` times its share of the global mean loss; DeepSpeed's average over ranks makes it
exact. The row log-sum-exp is ``fastclip_kernels.block_lse``: forward ``block_stats`` (no ``B x KB`` tensor
kept), backward one ``block_grads`` with ``a = dlse, b = lse`` and ``d lse_i / dθ = mom_i``.
"""

from __future__ import annotations

import torch
from fastclip_kernels import block_lse
from torch import Tensor

from .. import comm
from .base import ContrastiveLoss


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
        theta = logit_scale.reshape(1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        lse_img = block_lse(x, ts, theta, impl=self.impl)[0]
        lse_txt = block_lse(t, xs, theta, impl=self.impl)[0]
        pos = theta * (x.to(lse_img.dtype) * t.to(lse_img.dtype)).sum(1)
        loss = 0.5 * ((lse_img - pos).mean() + (lse_txt - pos).mean())
        return {"loss": loss, "objective": loss.detach(), "tau": (1.0 / theta).detach().reshape(())}
