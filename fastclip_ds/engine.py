"""DeepSpeed config assembly and engine creation (:func:`initialize`).

The DeepSpeed JSON (``--deepspeed_config``, DeepSpeed's own keys) owns ZeRO, precision and
``gradient_clipping``. The run config owns the batch, the optimizer and the schedules: the batch
keys are derived here from ``train.global_batch_size`` and the world size, so nobody types them twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import deepspeed
import torch

from .config import ConfigError, read_json_object
from .optim import enable_layerwise_lamb

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
OWNED_BY_RUN_CONFIG = {
    "optimizer": "the run config's optimizer section",
    "scheduler": "train.lr, train.warmup_steps and train.lr_scheduler in the run config",
}


def default_ds_config(on_cuda: bool) -> dict[str, Any]:
    """ZeRO-2 with gradient clipping 1.0: bf16 on GPU, fp32 on CPU (as ``ds_configs/*_zero2_*.json``)."""
    cfg: dict[str, Any] = {"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0, "steps_per_print": 10**6}
    if on_cuda:
        cfg["bf16"] = {"enabled": True}
    return cfg


def load_ds_config(path: str | Path | None, on_cuda: bool) -> tuple[dict[str, Any], str]:
    """The DeepSpeed JSON at ``path`` (or the default) and a name for it in error messages."""
    if path is None:
        return default_ds_config(on_cuda), "<default deepspeed config>"
    return read_json_object(path, "deepspeed config", "of DeepSpeed keys"), str(path)


def accumulation_steps(global_batch: int, world_size: int, micro_batch: int | None) -> int:
    """Micro-batches per rank and step: global batch = world size × micro-batch × accumulation steps (``None``:
    the micro-batch is the whole per-rank batch). The caller has checked that the micro-batch divides it."""
    per_rank = global_batch // world_size
    return 1 if micro_batch is None else per_rank // micro_batch


def build_ds_config(
    user: dict[str, Any],
    source: str,
    *,
    global_batch: int,
    world_size: int,
    on_cuda: bool,
    micro_batch: int | None = None,
) -> dict[str, Any]:
    """Complete a DeepSpeed config: batch keys from the global batch and ``train.micro_batch_size`` (``None``: the
    per-rank batch), checks for keys owned elsewhere."""
    cfg = json.loads(json.dumps(user))
    for key, owner in OWNED_BY_RUN_CONFIG.items():
        if key in cfg:
            raise ConfigError(f"{source}: {key}: set by {owner}; remove it from the DeepSpeed config")
    steps = accumulation_steps(global_batch, world_size, micro_batch)
    derived = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world_size // steps,
        "gradient_accumulation_steps": steps,
    }
    for key in BATCH_KEYS:
        if key in cfg and cfg[key] != derived[key]:
            raise ConfigError(
                f"{source}: {key}: {cfg[key]!r} contradicts train.global_batch_size={global_batch} and "
                f"train.micro_batch_size={micro_batch} on {world_size} rank(s) (expected {derived[key]}); "
                "leave batch keys out, they are derived"
            )
    if not on_cuda and cfg.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{source}: fp16.enabled: fp16 needs a GPU; use bf16 or fp32 on CPU")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage: {stage!r} is not one of 0, 1, 2, 3")
    cfg.update(derived)
    cfg["zero_allow_untested_optimizer"] = True  # our client optimizers (LAMB, Lion, torch AdamW/SGD)
    return cfg


def precision_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def initialize(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds_config: dict[str, Any]
) -> Any:
    """The DeepSpeed engine for our client optimizer and schedule (LAMB told the ZeRO partition layout)."""
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    enable_layerwise_lamb(engine)
    return engine


def clamp_logit_scale_after_step(optimizer: torch.optim.Optimizer, tau_min: float) -> None:
    """Clamp the ``logit_scale`` group to [0, ln(1/tau_min)] (τ in [tau_min, 1], ``loss.tau_min``; OpenCLIP's
    fixed bound is τ ≥ 0.01) after every inner optimizer step.

    A post-step hook on the client optimizer works at every ZeRO stage: DeepSpeed hands the inner
    optimizer its (fp32, possibly partitioned) copies of the group, so the clamp reaches the master
    weights, not a stale low-precision view.
    """

    high = math.log(1.0 / tau_min)

    def hook(opt: torch.optim.Optimizer, *_: Any) -> None:
        with torch.no_grad():
            for group in opt.param_groups:
                if group.get("name") == "logit_scale":
                    for p in group["params"]:
                        p.clamp_(0.0, high)

    optimizer.register_step_post_hook(hook)


def steps_guarded_by_deepspeed(engine: Any) -> bool:
    """Whether DeepSpeed's optimizer wrapper checks the gradients for inf/NaN and skips such a step itself
    (ZeRO 1-3 and the bf16/fp16 wrappers); at ZeRO-0 fp32 the client optimizer runs unguarded."""
    return hasattr(engine.optimizer, "overflow")


def grads_finite(engine: Any) -> bool:
    """All parameter gradients finite (after ``engine.backward``; at ZeRO-0 they are already averaged over ranks,
    so every rank reaches the same answer)."""
    peaks = [p.grad.detach().abs().amax() for p in engine.module.parameters() if p.grad is not None]
    return not peaks or bool(torch.isfinite(torch.stack(peaks)).all())


def scaler_skips_steps(engine: Any) -> bool:
    """Whether a step DeepSpeed skips is the fp16 dynamic loss scaler's overflow: it lowers the scale and goes on
    (and raises at its minimum scale), so such skips are routine, not a sign of a broken run."""
    return bool(engine.fp16_enabled() and engine.dynamic_loss_scale())
