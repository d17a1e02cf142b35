"""Contrastive losses: ``openclip`` (the baseline) and the FastCLIP family; :func:`build_loss` picks one.

Config keys (the run config's ``loss`` section, read once into :class:`LossSettings`; ``settings.py`` holds the
defaults, allowed values and every check):

    name                openclip | sogclr | isogclr | fastclip_v0 | fastclip_v1 | fastclip_v2 | fastclip_v3
    impl                similarity-block implementation: auto | triton | chunked | dense
    temperature         initial τ: the model's logit_scale = ln(1/τ) (global τ) or every per-sample τ (v2, isogclr)
    gamma               γ_min of the u update (sogclr/isogclr: the constant γ)
    gamma_schedule      auto (constant for sogclr/isogclr, cosine otherwise) | constant | cosine | cosine_step
    gamma_decay_epochs  E of the cosine γ schedule
    rho                 ρ of RGCL (fastclip_v2, fastclip_v3, isogclr)
    eps                 ε inside log(ε + g)
    tau_grad            fastclip_code (default): the published code's per-step update (Optimization-AI/fast_clip),
                        so the paper's ρ, γ and ε mean what the paper says; exact: the exact gradient of the
                        objectives as written in ``fastclip.py``. Also picks the three keys below when null/auto
    multiply_tau        features' gradient of the global-τ losses: true, that of τ·GCL (the public code's
                        --multiply_tau, exact for fastclip_v3's RGCL-g); false, that of GCL. null: true for
                        fastclip_v3 under fastclip_code, else false (see ``fastclip.py``)
    gamma_epoch0        one: γ = 1 throughout epoch 0 whatever the schedule (the public code); schedule: the
                        schedule's value (a constant γ starts at γ_min). auto: one under fastclip_code
    u_reset             tiny: when γ < 1, a stored u below 1e-35, infinite or NaN is replaced by g (the public
                        code); unseen: only a key never seen. auto: tiny under fastclip_code
    lr_tau              τ learning rate; null = the model lr (the trainer passes it to build_loss as ``lr``)
    tau_scheduler       schedule of the logit_scale learning rate (the trainer's): step_thresh | const | cosine |
                        auto (cosine = the model's warm-up + cosine for openclip and v0, step_thresh for v3)
    tau_min             lower clamp of τ (upper clamp 1)
    tau_beta1/2, tau_eps  per-sample τ Adam (fastclip_v2, isogclr)

Every difference from the published code, and which key selects which, is tabulated in docs/DESIGN.md.
Recipes from the paper's README are in ``recipes/`` (v3 on CC3M: ``rho 6.5, gamma 0.2, gamma_decay_epochs 18,
lr_tau 2e-4, tau_scheduler step_thresh``; v2 ``temperature 0.03, lr_tau 0.0133, rho 7``); SogCLR's own
default γ is 0.9.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .base import ContrastiveLoss
from .fastclip import FastClipLoss
from .openclip import OpenClipLoss
from .settings import CHOICES, DEFAULTS, LossSettings, resolve, resolve_config

__all__ = [
    "CHOICES",
    "DEFAULTS",
    "ContrastiveLoss",
    "FastClipLoss",
    "LossSettings",
    "OpenClipLoss",
    "build_loss",
    "resolve_config",
]


def build_loss(
    cfg: dict[str, Any],
    *,
    dataset_size: int,
    steps_per_epoch: int,
    lr: float | None = None,
    state_dtype: torch.dtype = torch.float32,
) -> ContrastiveLoss:
    """The loss named by ``cfg["name"]`` (see :func:`resolve`); ``lr`` is the model lr that a null ``lr_tau``
    stands for. Call after the process group is up (the per-sample state is sharded)."""
    settings = resolve(cfg)
    if settings.name == "openclip":
        return OpenClipLoss(impl=settings.impl)
    if settings.lr_tau is None:
        settings = dataclasses.replace(settings, lr_tau=lr)
    return FastClipLoss(settings, dataset_size=dataset_size, steps_per_epoch=steps_per_epoch, state_dtype=state_dtype)
