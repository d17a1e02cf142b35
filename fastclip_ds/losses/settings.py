"""The ``loss`` section of the run config as one validated, resolved object: :class:`LossSettings`.

Every allowed value and range of a loss key is checked here (``config.py`` calls :func:`resolve_config`);
``auto`` values are replaced by what they stand for, so a saved config shows what ran.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

OBJECTIVE = {
    "sogclr": "gcl",
    "fastclip_v0": "gcl",
    "fastclip_v1": "gcl",
    "fastclip_v3": "rgcl_g",
    "isogclr": "rgcl_i",
    "fastclip_v2": "rgcl_i",
}
LEARNS_LOGIT_SCALE = ("openclip", "fastclip_v0", "fastclip_v3")
CONSTANT_GAMMA = ("sogclr", "isogclr")


@dataclass(frozen=True)
class LossSettings:
    """One field per config key; the module docstrings of ``losses`` and ``losses.fastclip`` give the math."""

    name: str = "openclip"
    impl: str = "auto"
    temperature: float = 0.07
    gamma: float = 0.8
    gamma_schedule: str = "auto"
    gamma_decay_epochs: float = 10
    rho: float = 8.0
    eps: float = 1e-14
    tau_grad: str = "fastclip_code"
    multiply_tau: bool | None = None
    gamma_epoch0: str = "auto"
    u_reset: str = "auto"
    lr_tau: float | None = None
    tau_scheduler: str = "auto"
    tau_min: float = 0.01
    tau_beta1: float = 0.9
    tau_beta2: float = 0.98
    tau_eps: float = 1e-6

    @property
    def objective(self) -> str:
        return OBJECTIVE[self.name]

    @property
    def per_sample(self) -> bool:
        return self.objective == "rgcl_i"

    @property
    def learns_logit_scale(self) -> bool:
        return self.name in LEARNS_LOGIT_SCALE


DEFAULTS: dict[str, Any] = dataclasses.asdict(LossSettings())

CHOICES: dict[str, tuple[str, ...]] = {
    "name": ("openclip", *OBJECTIVE),
    "impl": ("auto", "triton", "chunked", "dense"),
    "gamma_schedule": ("auto", "constant", "cosine", "cosine_step"),
    "tau_grad": ("exact", "fastclip_code"),
    "gamma_epoch0": ("auto", "schedule", "one"),
    "u_reset": ("auto", "unseen", "tiny"),
    "tau_scheduler": ("auto", "step_thresh", "const", "cosine"),
}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"loss.{key}: {message}")


def resolve(cfg: dict[str, Any]) -> LossSettings:
    """``cfg`` over :data:`DEFAULTS`, validated (``ValueError("loss.<key>: ...")``), every ``auto`` resolved."""
    unknown = set(cfg) - set(DEFAULTS)
    _check(not unknown, min(unknown, default=""), f"unknown key (known: {', '.join(DEFAULTS)})")
    c = DEFAULTS | cfg
    for key, choices in CHOICES.items():
        _check(c[key] in choices, key, f"{c[key]!r} is not one of {', '.join(choices)}")
    for key in ("temperature", "eps", "tau_min", "gamma_decay_epochs"):
        _check(c[key] > 0, key, f"must be positive, got {c[key]!r}")
    _check(0 < c["gamma"] <= 1, "gamma", f"must be in (0, 1], got {c['gamma']!r}")
    _check(c["lr_tau"] is None or c["lr_tau"] > 0, "lr_tau", f"must be positive or null, got {c['lr_tau']!r}")
    _check(c["tau_min"] <= c["temperature"] <= 1, "temperature", f"{c['temperature']!r} is outside [loss.tau_min, 1]")
    name, code = c["name"], c["tau_grad"] == "fastclip_code"
    if c["gamma_schedule"] == "auto":
        c["gamma_schedule"] = "constant" if name in CONSTANT_GAMMA else "cosine"
    _check(
        name not in CONSTANT_GAMMA or c["gamma_schedule"] == "constant",
        "gamma_schedule",
        f"{name} uses a constant γ (got {c['gamma_schedule']!r})",
    )
    if c["tau_scheduler"] == "auto":
        c["tau_scheduler"] = "step_thresh" if name == "fastclip_v3" else "cosine"
    per_sample = OBJECTIVE.get(name) == "rgcl_i"
    _check(not (per_sample and c["multiply_tau"]), "multiply_tau", f"only for the global-τ losses, not {name}")
    if c["multiply_tau"] is None:
        c["multiply_tau"] = code and name == "fastclip_v3"
    if c["gamma_epoch0"] == "auto":
        c["gamma_epoch0"] = "one" if code else "schedule"
    if c["u_reset"] == "auto":
        c["u_reset"] = "tiny" if code else "unseen"
    return LossSettings(**c)


def resolve_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """:func:`resolve` as the plain dict the run config stores."""
    return dataclasses.asdict(resolve(cfg))
