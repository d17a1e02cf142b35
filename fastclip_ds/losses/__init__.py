"""Contrastive losses: ``openclip`` (the baseline) and the FastCLIP family; :func:`build_loss` picks one.

Config keys (the run config's ``loss`` section; :data:`DEFAULTS` lists them all):

    name                openclip | sogclr | isogclr | fastclip_v0 | fastclip_v1 | fastclip_v2 | fastclip_v3
    impl                similarity-block implementation: auto | triton | chunked | dense
    temperature         initial τ: the model's logit_scale = ln(1/τ) (global τ) or every per-sample τ (v2, isogclr)
    gamma               γ_min of the u update (sogclr/isogclr: the constant γ)
    gamma_schedule      auto (constant for sogclr/isogclr, cosine otherwise) | constant | cosine | cosine_step
    gamma_decay_epochs  E of the cosine γ schedule
    rho                 ρ of RGCL (fastclip_v2, fastclip_v3, isogclr)
    eps                 ε inside log(ε + g)
    multiply_tau        features' gradient of the global-τ losses: on, that of τ·GCL (the public code's
                        --multiply_tau; exact for fastclip_v3's RGCL-g); off, that of GCL (exact for sogclr,
                        v0, v1). Same minimiser in w for any fixed τ; off is not damped by AdamW's ε (see README)
    lr_tau              τ learning rate; null = the model lr (the trainer passes it to build_loss as ``lr``)
    tau_scheduler       schedule of the logit_scale learning rate (the trainer's): step_thresh | const | cosine |
                        auto (cosine = the model's warm-up + cosine for openclip and v0, step_thresh for v3)
    tau_min             lower clamp of τ (upper clamp 1)
    tau_beta1/2, tau_eps  per-sample τ Adam (fastclip_v2, isogclr)

Recipes from the paper's README (not defaults): v3 on CC3M ``rho 6.5, gamma 0.2, gamma_decay_epochs 18,
lr_tau 2e-4, tau_scheduler step_thresh``; v2 ``temperature 0.03, lr_tau 0.0133, rho 7``; SogCLR's own
default γ is 0.9.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ContrastiveLoss
from .fastclip import CONSTANT_GAMMA, GAMMA_SCHEDULES, OBJECTIVE, FastClipLoss
from .openclip import OpenClipLoss

DEFAULTS: dict[str, Any] = {
    "name": "openclip",
    "impl": "auto",
    "temperature": 0.07,
    "gamma": 0.8,
    "gamma_schedule": "auto",
    "gamma_decay_epochs": 10,
    "rho": 8.0,
    "eps": 1e-14,
    "multiply_tau": False,
    "lr_tau": None,
    "tau_scheduler": "auto",
    "tau_min": 0.01,
    "tau_beta1": 0.9,
    "tau_beta2": 0.98,
    "tau_eps": 1e-6,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "name": ("openclip", *OBJECTIVE),
    "impl": ("auto", "triton", "chunked", "dense"),
    "gamma_schedule": ("auto", *GAMMA_SCHEDULES),
    "tau_scheduler": ("auto", "step_thresh", "const", "cosine"),
}

__all__ = ["CHOICES", "DEFAULTS", "ContrastiveLoss", "FastClipLoss", "OpenClipLoss", "build_loss", "resolve_config"]


def resolve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` over :data:`DEFAULTS`, validated, with every ``auto`` replaced by the value it stands for."""
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"loss.{sorted(unknown)[0]}: unknown key (known: {', '.join(DEFAULTS)})")
    c = DEFAULTS | cfg
    for key, choices in CHOICES.items():
        if c[key] not in choices:
            raise ValueError(f"loss.{key}: {c[key]!r} is not one of {', '.join(choices)}")
    if c["gamma_schedule"] == "auto":
        c["gamma_schedule"] = "constant" if c["name"] in CONSTANT_GAMMA else "cosine"
    if c["tau_scheduler"] == "auto":
        c["tau_scheduler"] = "step_thresh" if c["name"] == "fastclip_v3" else "cosine"
    return c


def build_loss(
    cfg: dict[str, Any],
    *,
    dataset_size: int,
    steps_per_epoch: int,
    lr: float | None = None,
    state_dtype: torch.dtype = torch.float32,
) -> ContrastiveLoss:
    """The loss named by ``cfg["name"]`` (see :func:`resolve_config`); ``lr`` is the model lr that a null
    ``lr_tau`` stands for. Call after the process group is up (the per-sample state is sharded)."""
    c = resolve_config(cfg)
    if c["name"] == "openclip":
        return OpenClipLoss(impl=c["impl"])
    return FastClipLoss(
        c["name"],
        dataset_size=dataset_size,
        steps_per_epoch=steps_per_epoch,
        gamma=c["gamma"],
        gamma_schedule=c["gamma_schedule"],
        gamma_decay_epochs=c["gamma_decay_epochs"],
        rho=c["rho"],
        eps=c["eps"],
        multiply_tau=c["multiply_tau"],
        temperature=c["temperature"],
        tau_min=c["tau_min"],
        lr_tau=c["lr_tau"] if c["lr_tau"] is not None else lr,
        tau_beta1=c["tau_beta1"],
        tau_beta2=c["tau_beta2"],
        tau_eps=c["tau_eps"],
        impl=c["impl"],
        state_dtype=state_dtype,
    )
