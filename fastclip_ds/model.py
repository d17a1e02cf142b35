"""open_clip models by name or config JSON, with DeepSpeed-safe ``[1]``-shaped scalar parameters.

A model spec is either a registered open_clip model name (open_clip's own configs plus the tiny CPU
configs shipped in ``fastclip_ds/model_configs/``) or a path to an open_clip model-config JSON
(``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``), which gets registered under its file stem.

open_clip creates ``logit_scale`` (and ``logit_bias``) as 0-dim parameters, which DeepSpeed 0.19.8 cannot
broadcast; models built here hold them as ``[1]`` tensors. :func:`to_open_clip_state_dict` and
:func:`from_open_clip_state_dict` convert state dicts between the two layouts.

:func:`build_model` makes a run's model from its config: open_clip's overrides (``force_quick_gelu``, image size,
augmentation), starting weights (``model.pretrained``: a local checkpoint file; ``train.init_from``: another run's
latest complete checkpoint) and LiT locking with open_clip's ``lock_image_tower`` / ``lock_text_tower``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
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


def create_model(
    spec: str,
    *,
    init_temperature: float | None = None,
    seed: int | None = None,
    force_quick_gelu: bool = False,
    image_size: int | None = None,
    aug_cfg: dict | None = None,
) -> ModelBundle:
    """Build a randomly initialised open_clip model (``output_dict=True``) with its transforms and tokenizer.

    ``init_temperature`` τ sets ``logit_scale = log(1/τ)``; ``seed`` makes the initialisation reproducible
    without touching the global RNG state. ``force_quick_gelu`` and ``image_size`` are open_clip's
    ``force_quick_gelu`` / ``force_image_size`` (``config`` then holds the model actually built); ``aug_cfg``
    holds open_clip ``AugmentationCfg`` fields for the train transform.
    """
    name, config = resolve_model_config(spec)
    open_clip = open_clip_with_configs()
    kwargs = _overrides(force_quick_gelu, image_size)
    config = _overridden_config(config, force_quick_gelu, image_size)
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
        train_transform=open_clip.image_transform(is_train=True, aug_cfg=aug_cfg, **pp),
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


def _overrides(force_quick_gelu: bool, image_size: int | None) -> dict:
    """open_clip ``create_model`` keyword arguments of the model overrides."""
    return {"force_quick_gelu": force_quick_gelu, "force_image_size": image_size}


def _overridden_config(config: dict, force_quick_gelu: bool, image_size: int | None) -> dict:
    """The model config open_clip builds under the overrides (what an export must describe)."""
    config = json.loads(json.dumps(config))
    if force_quick_gelu:
        config["quick_gelu"] = True
    if image_size is not None:
        config["vision_cfg"]["image_size"] = image_size
    return config


def run_model(model_cfg: Mapping) -> tuple[str, dict, dict]:
    """``(open_clip name, model config as built, open_clip create_model overrides)`` of a run config's ``model``
    section (``force_quick_gelu`` / ``image_size`` absent, as in older runs: off)."""
    name, config = resolve_model_config(model_cfg["config"])
    quick, size = model_cfg.get("force_quick_gelu", False), model_cfg.get("image_size")
    return name, _overridden_config(config, quick, size), _overrides(quick, size)


def augmentation_keys() -> tuple[str, ...]:
    """The fields of open_clip's ``AugmentationCfg`` (the keys ``data.aug_cfg`` may hold)."""
    return tuple(f.name for f in dataclasses.fields(open_clip_with_configs().AugmentationCfg))


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a local checkpoint file: a ``fastclip-ds export``, ``open_clip_train``'s ``epoch_*.pt``
    (``state_dict`` with ``module.`` prefixes) or an open_clip ``.bin`` / ``.safetensors``; scalars as ``[1]``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        sd = open_clip_with_configs().factory.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # torch / safetensors raise many types for a file that is not a checkpoint
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return from_open_clip_state_dict(sd)


def fit_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``sd`` with position embeddings resized to ``model`` (as open_clip does); a one-line ValueError naming the
    first mismatching keys when anything else differs (missing or unexpected keys, shapes)."""
    open_clip = open_clip_with_configs()
    sd = dict(sd)
    for resize in (open_clip.model.resize_pos_embed, open_clip.model.resize_text_pos_embed):
        with contextlib.suppress(AssertionError, RuntimeError):  # not resizable: reported as a mismatch below
            resize(sd, model)
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in own]
    problems += [
        f"{k} is {list(sd[k].shape)}, model has {list(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if problems:
        raise ValueError(f"{source} does not fit the model: {len(problems)} mismatch(es): {'; '.join(problems[:3])}")
    return sd


def lock_towers(model: torch.nn.Module, cfg: Mapping) -> None:
    """LiT with open_clip's meanings: ``lock_image`` / ``lock_text`` of the ``model`` section (``requires_grad``
    off, so :func:`fastclip_ds.optim.param_groups` leaves those parameters out of the optimizer)."""
    if cfg["lock_image"]:
        model.lock_image_tower(
            unlocked_groups=cfg["lock_image_unlocked_groups"], freeze_bn_stats=cfg["lock_image_freeze_bn_stats"]
        )
    if cfg["lock_text"]:
        try:
            model.lock_text_tower(
                unlocked_layers=cfg["lock_text_unlocked_layers"], freeze_layer_norm=cfg["lock_text_freeze_layer_norm"]
            )
        except AssertionError as err:  # open_clip's CLIP cannot leave the text LayerNorms trainable
            raise ValueError(f"model.lock_text_freeze_layer_norm: {err}") from None


def check_model(cfg: Mapping) -> None:
    """Build the run's model on the meta device (no memory, no compute) with its overrides, ``model.pretrained``
    and locking: a mismatch is a one-line ValueError ``"model.<key>: ..."`` before any process group."""
    m = cfg["model"]
    name, _, overrides = run_model(m)
    open_clip = open_clip_with_configs()
    with torch.device("meta"):
        model = open_clip.create_model(name, nonscalar_logit_scale=True, device="meta", **overrides)
    if m["pretrained"]:
        try:
            fit_state_dict(model, read_checkpoint(m["pretrained"]), m["pretrained"])
        except (OSError, ValueError) as err:
            raise ValueError(f"model.pretrained: {err}") from None
    lock_towers(model, m)
    try:
        open_clip.image_transform(model.visual.preprocess_cfg["size"], is_train=True, aug_cfg=cfg["data"]["aug_cfg"])
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"data.aug_cfg: open_clip rejects it ({type(err).__name__}: {err})") from None


def starting_weights(pretrained: str | None, init_from: str | None) -> tuple[dict[str, torch.Tensor], str] | None:
    """``(state dict, source)`` of ``model.pretrained`` (a file) or ``train.init_from`` (a run directory: its latest
    complete checkpoint, any ZeRO stage, without optimizer or data position); None for neither."""
    if pretrained:
        return read_checkpoint(pretrained), f"model.pretrained {pretrained}"
    if init_from:
        from .export import consolidate  # export imports this module

        sd, _ = consolidate(Path(init_from).expanduser() / "checkpoints")
        return from_open_clip_state_dict(sd), f"train.init_from {init_from}"
    return None


def build_model(cfg: Mapping) -> ModelBundle:
    """The run's model from its config sections (``model``, ``data.aug_cfg``, ``loss.temperature``, ``train.seed``,
    ``train.init_from``): random init, then the starting weights, then LiT locking."""
    m, init_from = cfg["model"], cfg["train"]["init_from"]
    bundle = create_model(
        m["config"],
        init_temperature=cfg["loss"]["temperature"],
        seed=cfg["train"]["seed"],
        force_quick_gelu=m["force_quick_gelu"],
        image_size=m["image_size"],
        aug_cfg=cfg["data"]["aug_cfg"],
    )
    start = starting_weights(m["pretrained"], init_from)
    if start is not None:
        bundle.model.load_state_dict(fit_state_dict(bundle.model, *start))
    lock_towers(bundle.model, m)
    return bundle
