"""open_clip models by name or config JSON, with DeepSpeed-safe ``[1]``-shaped scalar parameters.

A model spec is either a registered open_clip model name (open_clip's own configs plus the tiny CPU
configs shipped in ``fastclip_ds/model_configs/``) or a path to an open_clip model-config JSON
(``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``), which gets registered under its file stem.

open_clip creates ``logit_scale`` (and ``logit_bias``) as 0-dim parameters, which DeepSpeed 0.19.8 cannot
broadcast; models built here hold them as ``[1]`` tensors. :func:`to_open_clip_state_dict` and
:func:`from_open_clip_state_dict` convert state dicts between the two layouts.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from fastclip_ds.compat import import_open_clip

CONFIG_DIR = Path(__file__).parent / "model_configs"
SCALAR_KEYS = ("logit_scale", "logit_bias")
_REQUIRED_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


@dataclass
class ModelBundle:
    """A model with its transforms and tokenizer; ``config`` is the open_clip model config dict."""

    model: torch.nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    name: str
    config: dict


@cache
def open_clip_with_configs():
    """The open_clip module, with this package's model configs registered (once per process)."""
    open_clip = import_open_clip()
    open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def resolve_model_config(spec: str) -> tuple[str, dict]:
    """Resolve a model name or config-JSON path to ``(registered name, config dict)``.

    A JSON path is registered with open_clip under its file stem, so that open_clip's own functions
    (``create_model``, ``get_tokenizer``) accept the returned name.
    """
    open_clip = open_clip_with_configs()
    if not spec.endswith(".json"):
        config = open_clip.get_model_config(spec)
        if config is None:
            raise ValueError(f"unknown model {spec!r}: not an open_clip model name nor a path to a model-config .json")
        return spec, config
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"model config file not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {path}: invalid JSON ({err})") from None
    missing = [k for k in _REQUIRED_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        raise ValueError(f"model config {path}: missing key(s) {', '.join(missing)} (open_clip model-config schema)")
    name = path.stem
    registered = open_clip.get_model_config(name)
    if registered is not None and registered != config:
        raise ValueError(f"model config {path}: the name {name!r} already names a different model; rename the file")
    if registered is None:
        open_clip.add_model_config(path)
    return name, config


def create_model(spec: str, *, init_temperature: float | None = None, seed: int | None = None) -> ModelBundle:
    """Build a randomly initialised open_clip model (``output_dict=True``) with its transforms and tokenizer.

    ``init_temperature`` τ sets ``logit_scale = log(1/τ)``; ``seed`` makes the initialisation reproducible
    without touching the global RNG state.
    """
    name, config = resolve_model_config(spec)
    open_clip = open_clip_with_configs()
    kwargs = {}
    if init_temperature is not None:
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        kwargs["init_logit_scale"] = math.log(1.0 / init_temperature)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        model = open_clip.create_model(name, output_dict=True, nonscalar_logit_scale=True, **kwargs)
    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ValueError(f"model {name!r} has 0-dim parameters DeepSpeed cannot handle: {', '.join(scalars)}")
    pp = {k: v for k, v in model.visual.preprocess_cfg.items() if k != "mode"}  # open_clip: mode is always RGB
    pp["image_size"] = pp.pop("size")
    return ModelBundle(
        model=model,
        train_transform=open_clip.image_transform(is_train=True, **pp),
        eval_transform=open_clip.image_transform(is_train=False, **pp),
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        config=config,
    )


def to_open_clip_state_dict(sd: dict) -> dict:
    """Reshape the ``[1]`` top-level scalars (``logit_scale``, ``logit_bias``) back to open_clip's ``[]``."""
    return {k: v.reshape(()) if k in SCALAR_KEYS and v.numel() == 1 else v for k, v in sd.items()}


def from_open_clip_state_dict(sd: dict) -> dict:
    """Reshape open_clip's 0-dim top-level scalars to the ``[1]`` shape used by :func:`create_model`."""
    return {k: v.reshape(1) if k in SCALAR_KEYS and v.dim() == 0 else v for k, v in sd.items()}
