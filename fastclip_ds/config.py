"""Run configuration: embedded defaults, JSON files, ``--set a.b=value`` overrides, validation.

A run config has the sections ``data``, ``model``, ``loss``, ``optimizer``, ``train`` and ``eval``.
Every key a user may set exists in :func:`default_config`; anything else is an error that names the
key and the file it came from, raised before any process group starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data, digits
from .model import check_model, resolve_model_config

# ``losses`` and ``optim`` are imported where used: they import comm -> ds_compat -> config (ConfigError).

DEFAULT_SOURCE = "<defaults>"
SET_SOURCE = "--set"
WANDB_MODES = ("online", "offline")
EVAL_AUTO = "auto"  # eval.data: the digits test split when training on the embedded digits shards, else none

# Keys that may be null: the type a non-null value must have.
NULLABLE: dict[str, type | tuple[type, ...]] = {
    "data.dataset_size": int,
    "data.source_sizes": list,
    "data.upsampling_factors": list,
    "data.num_workers": int,
    "train.max_steps": int,
    "train.micro_batch_size": int,
    "eval.data": str,
    "data.aug_cfg": dict,
    "model.pretrained": str,
    "model.image_size": int,
    "train.init_from": str,
    "train.wandb_project": str,
    "loss.lr_tau": (int, float),
    "loss.multiply_tau": bool,
}


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of the enumerated keys, each from the module that uses it."""
    from . import losses, optim

    return {
        "data.split": data.SPLITS,
        "train.lr_scheduler": optim.LR_SCHEDULERS,
        "train.wandb_mode": WANDB_MODES,
        "optimizer.name": optim.OPTIMIZERS,
        **{f"loss.{k}": v for k, v in losses.CHOICES.items()},
    }


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key, the value and the source."""


def train_defaults() -> dict[str, Any]:
    return {
        "global_batch_size": 64,
        "micro_batch_size": None,
        "epochs": 10,
        "max_steps": None,
        "seed": 0,
        "lr": 5e-4,
        "lr_min": 0.0,
        "lr_scheduler": "cosine",
        "warmup_steps": 50,
        "save_every_steps": 0,
        "keep_checkpoints": 2,
        "output_dir": "runs/digits",
        "log_every_steps": 10,
        "max_nonfinite_steps": 10,
        "collective_timeout_s": 600.0,
        "init_from": None,
        "wandb_project": None,
        "wandb_mode": "online",
    }


def default_config() -> dict[str, Any]:
    """The embedded default run: a tiny CLIP on the scikit-learn digits shards (written on first use)."""
    from . import losses, optim

    return {
        "data": {
            "train": digits.train_pattern(digits.DEFAULT_ROOT),
            "num_samples": digits.NUM_TRAIN,
            "dataset_size": None,
            "split": "streams",
            "streams": 64,
            "source_sizes": None,
            "upsampling_factors": None,
            "resampled": False,
            "csv_img_key": "filepath",
            "csv_caption_key": "title",
            "csv_separator": "\t",
            "num_workers": None,
            "shuffle_buffer": data.SHUFFLE_BUFFER,
            "augment": True,
            "aug_cfg": None,
            "max_bad_fraction": 0.1,
        },
        "model": {
            "config": "fastclip-tiny",
            "pretrained": None,
            "force_quick_gelu": False,
            "image_size": None,
            "lock_image": False,
            "lock_image_unlocked_groups": 0,
            "lock_image_freeze_bn_stats": False,
            "lock_text": False,
            "lock_text_unlocked_layers": 0,
            "lock_text_freeze_layer_norm": True,
            "grad_checkpointing": False,
        },
        "loss": dict(losses.DEFAULTS),
        "optimizer": dict(optim.DEFAULTS),
        "train": train_defaults(),
        "eval": {"data": EVAL_AUTO, "every_steps": 0, "batch_size": 256},
    }


@dataclass
class RunConfig:
    """The resolved config plus where each leaf value came from (for error messages)."""

    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    def source(self, key: str) -> str:
        return self.sources.get(key, DEFAULT_SOURCE)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source(key)}: {key}: {message}")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.values, indent=2, sort_keys=True) + "\n")


def _flatten(tree: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``section.key`` leaves; a key's value may itself be an object (``data.aug_cfg``)."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix:
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _assign(cfg: RunConfig, defaults: dict[str, Any], key: str, value: Any, source: str) -> None:
    section, _, leaf = key.partition(".")
    if section not in defaults or not isinstance(defaults[section], dict):
        raise ConfigError(f"{source}: {key}: unknown section {section!r} (known: {', '.join(defaults)})")
    if leaf not in defaults[section]:
        known = ", ".join(f"{section}.{k}" for k in defaults[section])
        raise ConfigError(f"{source}: {key}: unknown key (known: {known})")
    cfg.values[section][leaf] = value
    cfg.sources[key] = source


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value``; the value is read as JSON when it parses (numbers, true, null, lists), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{SET_SOURCE}: {text!r}: expected dotted.key=value")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def read_json_object(path: str | os.PathLike, what: str, expected: str) -> dict[str, Any]:
    """The JSON object in ``path``; a one-line :class:`ConfigError` naming the file otherwise."""
    try:
        tree = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a JSON object {expected}")
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults, then the JSON file at ``path``, then ``--set`` overrides; types and choices checked."""
    defaults = default_config()
    cfg = RunConfig(json.loads(json.dumps(defaults)))
    if path is not None:
        source = str(path)
        tree = read_json_object(path, "config file", f"with sections {', '.join(defaults)}")
        for section, body in tree.items():
            if not isinstance(body, dict):
                raise ConfigError(f"{source}: {section}: expected an object of keys, got {body!r}")
        for key, value in _flatten(tree):
            _assign(cfg, defaults, key, value, source)
    for text in overrides:
        key, value = parse_override(text)
        _assign(cfg, defaults, key, value, SET_SOURCE)
    _check_types(cfg, defaults)
    return cfg


def _type_name(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _check_types(cfg: RunConfig, defaults: dict[str, Any]) -> None:
    allowed = choices()
    for key, default in _flatten(defaults):
        section, _, leaf = key.partition(".")
        value = cfg.values[section][leaf]
        if value is None and (default is None or key in NULLABLE):
            continue
        expected = (
            NULLABLE.get(key) if default is None else (int, float) if isinstance(default, float) else type(default)
        )
        if expected is None:
            continue
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected in (int, (int, float)))
        if not ok:
            raise cfg.error(key, f"expected {_type_name(expected)}, got {value!r}")
        if key in allowed and value not in allowed[key]:
            raise cfg.error(key, f"{value!r} is not one of {', '.join(allowed[key])}")


def validate(cfg: RunConfig, world_size: int) -> None:
    """Checks that need more than one key: batch arithmetic against the world size, ranges, paths."""
    train, data = cfg["train"], cfg["data"]
    batch = train["global_batch_size"]
    positive = [
        "train.global_batch_size",
        "train.epochs",
        "data.num_samples",
        "train.log_every_steps",
        "eval.batch_size",
    ]
    for key in positive:
        section, _, leaf = key.partition(".")
        if cfg[section][leaf] <= 0:
            raise cfg.error(key, f"must be positive, got {cfg[section][leaf]!r}")
    for key in ("train.lr", "train.warmup_steps", "train.save_every_steps", "train.lr_min", "eval.every_steps"):
        section, _, leaf = key.partition(".")
        if cfg[section][leaf] < 0:
            raise cfg.error(key, f"must be >= 0, got {cfg[section][leaf]!r}")
    if batch % world_size:
        raise cfg.error("train.global_batch_size", f"{batch} is not divisible by the world size {world_size} (ranks)")
    if batch > data["num_samples"]:
        raise cfg.error("train.global_batch_size", f"{batch} exceeds data.num_samples={data['num_samples']}")
    micro = train["micro_batch_size"]
    if micro is not None and (micro <= 0 or (batch // world_size) % micro):
        raise cfg.error(
            "train.micro_batch_size",
            f"{micro} is not a positive divisor of the per-rank batch {batch // world_size} "
            f"(train.global_batch_size={batch} on {world_size} rank(s))",
        )
    if train["max_steps"] is not None and train["max_steps"] <= 0:
        raise cfg.error("train.max_steps", f"must be positive or null, got {train['max_steps']!r}")
    if data["dataset_size"] is not None and data["dataset_size"] <= 0:
        raise cfg.error("data.dataset_size", f"must be positive or null, got {data['dataset_size']!r}")
    if data["num_workers"] is not None and not 0 <= data["num_workers"] <= 16:
        raise cfg.error("data.num_workers", f"must be between 0 and 16, got {data['num_workers']!r}")
    if train["lr_scheduler"] == "cosine" and total_steps(cfg) <= train["warmup_steps"]:
        raise cfg.error(
            "train.warmup_steps", f"{train['warmup_steps']} must be below the run's {total_steps(cfg)} steps for cosine"
        )
    if not data["train"].strip():
        raise cfg.error("data.train", "empty shard pattern")
    if data["split"] == "streams":
        from .data import parse_sources
        from .streams import stream_layout

        try:
            shards = sum(len(src.urls) for src in parse_sources(data["train"], None, csv_layout=csv_layout(cfg)))
            stream_layout(data["streams"], shards, world_size, 1, batch)  # any worker count fits the family
        except OSError as err:
            raise cfg.error("data.train", str(err)) from None
        except ValueError as err:
            raise cfg.error("data.streams", str(err)) from None
    _validate_sources(cfg)
    if not 0 <= data["max_bad_fraction"] <= 1:
        raise cfg.error("data.max_bad_fraction", f"must be in [0, 1], got {data['max_bad_fraction']!r}")
    for key in ("train.max_nonfinite_steps", "train.collective_timeout_s"):
        section, _, leaf = key.partition(".")
        if cfg[section][leaf] <= 0:
            raise cfg.error(key, f"must be positive, got {cfg[section][leaf]!r}")
    if train["keep_checkpoints"] < 0:
        raise cfg.error("train.keep_checkpoints", f"must be >= 0 (0 keeps all), got {train['keep_checkpoints']!r}")
    from . import optim

    try:
        optim.check_config(cfg["optimizer"])
    except ValueError as err:
        key, _, message = str(err).partition(": ")
        raise cfg.error(key, message) from None
    _resolve_loss(cfg)
    _resolve_eval_data(cfg)
    _validate_model_options(cfg)


def _validate_model_options(cfg: RunConfig) -> None:
    """Starting weights, LiT, image size, ``data.aug_cfg`` keys and wandb."""
    from .model import augmentation_keys

    model, train = cfg["model"], cfg["train"]
    if model["pretrained"] and train["init_from"]:
        raise cfg.error("train.init_from", "set either model.pretrained or train.init_from, not both")
    if model["image_size"] is not None and model["image_size"] <= 0:
        raise cfg.error("model.image_size", f"must be positive or null, got {model['image_size']!r}")
    for leaf in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
        if model[leaf] < 0:
            raise cfg.error(f"model.{leaf}", f"must be >= 0, got {model[leaf]!r}")
    unknown = [k for k in cfg["data"]["aug_cfg"] or {} if k not in augmentation_keys()]
    if unknown:
        raise cfg.error("data.aug_cfg", f"unknown key {unknown[0]!r} (open_clip's: {', '.join(augmentation_keys())})")
    if train["wandb_project"] and importlib.util.find_spec("wandb") is None:
        raise cfg.error("train.wandb_project", "needs the wandb package: pip install 'fastclip-ds[wandb]'")


def csv_layout(cfg: RunConfig) -> Any:
    """The :class:`~fastclip_ds.data.CsvLayout` of ``data.csv_*`` (for a ``.csv``/``.tsv`` source)."""
    d = cfg["data"]
    return data.CsvLayout(d["csv_img_key"], d["csv_caption_key"], d["csv_separator"])


def _validate_sources(cfg: RunConfig) -> None:
    data = cfg["data"]
    parts = len(data["train"].split("::"))
    for key, kind in (("source_sizes", int), ("upsampling_factors", (int, float))):
        values = data[key]
        if values is not None and (
            len(values) != parts or not all(isinstance(v, kind) and not isinstance(v, bool) and v > 0 for v in values)
        ):
            raise cfg.error(f"data.{key}", f"needs {parts} positive number(s), one per '::'-separated source: {values}")
    if data["upsampling_factors"] is not None and not data["resampled"]:
        raise cfg.error("data.upsampling_factors", "needs data.resampled=true (as OpenCLIP's)")
    if data["resampled"] and data["split"] != "streams":
        raise cfg.error("data.resampled", f"needs data.split=streams, got {data['split']!r}")
    sizes, size = data["source_sizes"], data["dataset_size"]
    if sizes is not None and size is not None and size != sum(sizes):
        raise cfg.error("data.dataset_size", f"{size} is not the sum of data.source_sizes ({sum(sizes)}); use null")


def _resolve_eval_data(cfg: RunConfig) -> None:
    """``eval.data = auto``: the digits test split when the run trains on the embedded digits shards (the split
    it was made for), else no evaluation; the saved config shows which."""
    if cfg["eval"]["data"] == EVAL_AUTO:
        on_digits = cfg["data"]["train"] == digits.train_pattern(digits.DEFAULT_ROOT)
        cfg.values["eval"]["data"] = str(digits.eval_root(digits.DEFAULT_ROOT)) if on_digits else None


def _resolve_loss(cfg: RunConfig) -> None:
    """Fill the loss section's ``auto`` values (the saved config shows what ran); ``losses.settings`` checks it."""
    from . import losses

    try:
        cfg.values["loss"] = losses.resolve_config(cfg["loss"])
    except ValueError as err:
        key, _, message = str(err).partition(": ")
        raise cfg.error(key, message) from None


def check_environment(cfg: RunConfig) -> Path:
    """What the run reads and writes, checked before any process group: a writable ``train.output_dir`` (created;
    returned), ``model.config``, every shard of ``data.train`` (the digits demo is written on first use) and the
    ``eval.data`` directory."""
    out = Path(cfg["train"]["output_dir"]).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise cfg.error("train.output_dir", f"{str(out)!r} is not writable ({err.strerror})") from None
    try:
        resolve_model_config(cfg["model"]["config"])
    except (ValueError, FileNotFoundError) as err:
        raise cfg.error("model.config", str(err)) from None
    _check_starting_weights(cfg)
    pattern = cfg["data"]["train"]
    if pattern == digits.train_pattern(digits.DEFAULT_ROOT):
        digits.ensure_digits(digits.DEFAULT_ROOT)
    try:
        urls = data.expand_urls(pattern)
    except ValueError as err:
        raise cfg.error("data.train", str(err)) from None
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:
        raise cfg.error(
            "data.train", f"{pattern!r}: {len(missing)} of {len(urls)} shard(s) missing, first: {missing[0]}"
        )
    if cfg["eval"]["data"] and not Path(cfg["eval"]["data"]).expanduser().is_dir():
        raise cfg.error("eval.data", f"{cfg['eval']['data']!r} is not a directory")
    return out


def _check_starting_weights(cfg: RunConfig) -> None:
    """``train.init_from`` has a complete checkpoint; the model with its overrides, ``model.pretrained`` and LiT
    locking builds (on the meta device: the checkpoint's keys and shapes fit)."""
    from .checkpoint import resolve

    init_from = cfg["train"]["init_from"]
    if init_from:
        try:
            resolve(Path(init_from).expanduser() / "checkpoints", "latest", option="train.init_from")
        except FileNotFoundError as err:
            raise cfg.error("train.init_from", str(err)) from None
    try:
        check_model(cfg)
    except ValueError as err:
        key, _, message = str(err).partition(": ")
        raise cfg.error(key, message) from None


def total_steps(cfg: RunConfig) -> int:
    """Optimizer steps of the whole run: epochs × (num_samples // global batch), capped by max_steps."""
    steps = cfg["train"]["epochs"] * (cfg["data"]["num_samples"] // cfg["train"]["global_batch_size"])
    cap = cfg["train"]["max_steps"]
    return steps if cap is None else min(steps, cap)


def dataset_size(cfg: RunConfig) -> int:
    """Number of per-sample state slots: ``data.dataset_size``, else the sum of ``data.source_sizes``, else
    ``data.num_samples``."""
    data = cfg["data"]
    if data["dataset_size"] is not None:
        return data["dataset_size"]
    return data["num_samples"] if data["source_sizes"] is None else sum(data["source_sizes"])


KEY_HELP: dict[str, str] = {
    "data.train": "webdataset shards: brace pattern, '::' joins several (img2dataset layout, integer json 'key')",
    "data.num_samples": "samples per epoch (steps per epoch = num_samples // global batch)",
    "data.dataset_size": "slots of per-sample loss state, > the largest key; null = sum(source_sizes) or num_samples",
    "data.source_sizes": "null (the '::' sources share one key space) or per source its key count: source j's keys "
    "[0, n_j) land at sum(n_<j) + key, so sources never share per-sample state",
    "data.upsampling_factors": "per source, how much more often each of its shards is drawn (OpenCLIP's meaning; "
    "needs data.resampled)",
    "data.resampled": "draw shards with replacement (OpenCLIP's --dataset-resampled); an epoch is data.num_samples",
    "data.csv_img_key": "a .csv/.tsv source: the image path column (OpenCLIP's --csv-img-key); key = row number",
    "data.csv_caption_key": "a .csv/.tsv source: the caption column (OpenCLIP's --csv-caption-key)",
    "data.csv_separator": "a .csv/.tsv source: the column separator (OpenCLIP's --csv-separator)",
    "data.split": "streams: each shard read once per pass and the same global batches for any world size dividing "
    "data.streams; global: same batches for any world size, every rank reads everything; rank: OpenCLIP-style",
    "data.streams": "logical data streams (streams mode; fewer if fewer shards): the world size must divide it and it "
    "the global batch",
    "data.num_workers": "DataLoader workers per rank (null: from the CPUs per local rank, 1..8)",
    "data.shuffle_buffer": "samples in the shuffle buffer (streams mode: valid samples per shuffled block of a shard)",
    "data.augment": "random-crop augmentation of training images (false: the eval transform)",
    "data.aug_cfg": "null or open_clip's AugmentationCfg keys for the train transform (scale, ratio, color_jitter, "
    'color_jitter_prob, gray_scale_prob, re_prob, re_count, use_timm), e.g. {"scale": [0.4, 1.0]}',
    "data.max_bad_fraction": "stop when more than this fraction of read samples is bad (corrupt, undecodable, ...)",
    "model.config": "open_clip model name (RN50, ViT-B-32, fastclip-tiny, fastclip-micro) or a model-config JSON",
    "model.pretrained": "starting weights from a local file: a fastclip-ds export, open_clip_train's epoch_*.pt or an "
    "open_clip .bin/.safetensors (keys and shapes must fit the model)",
    "model.force_quick_gelu": "QuickGELU activations (OpenCLIP's --force-quick-gelu; OpenAI's weights need it)",
    "model.image_size": "override the model's image size (OpenCLIP's --force-image-size); null: the config's",
    "model.lock_image": "LiT: freeze the image tower (OpenCLIP's --lock-image); frozen weights get no optimizer state",
    "model.lock_image_unlocked_groups": "leave the last N layer groups of a locked image tower trainable",
    "model.lock_image_freeze_bn_stats": "freeze the BatchNorm statistics of a locked image tower (ResNet/timm)",
    "model.lock_text": "freeze the text tower (OpenCLIP's --lock-text)",
    "model.lock_text_unlocked_layers": "leave the last N layers of a locked text tower trainable",
    "model.lock_text_freeze_layer_norm": "freeze a locked text tower's LayerNorms too (false: HF text towers only)",
    "model.grad_checkpointing": "recompute both towers' activations in backward (open_clip's set_grad_checkpointing; "
    "OpenCLIP's --grad-checkpointing): less memory, one more forward of each block",
    "loss.name": "openclip | sogclr | isogclr | fastclip_v0 | fastclip_v1 | fastclip_v2 | fastclip_v3",
    "loss.impl": "similarity kernels: auto (triton on CUDA, else chunked) | triton | chunked | dense",
    "loss.temperature": "initial τ (global, or every per-sample τ for fastclip_v2/isogclr)",
    "loss.gamma": "γ_min of the u moving average (sogclr/isogclr: the constant γ)",
    "loss.gamma_schedule": "auto | constant | cosine (per epoch, γ=1 in epoch 0) | cosine_step (per step)",
    "loss.gamma_decay_epochs": "epochs over which the cosine γ schedule decays to γ_min",
    "loss.rho": "ρ of the robust losses (fastclip_v2, fastclip_v3, isogclr)",
    "loss.eps": "ε inside log(ε + g)",
    "loss.tau_grad": "fastclip_code (the published code's update: paper ρ/γ/ε mean the paper's) | exact",
    "loss.multiply_tau": "features' gradient of global-τ losses from τ·GCL (public --multiply_tau), not GCL; "
    "null = on for fastclip_v3 under tau_grad=fastclip_code",
    "loss.gamma_epoch0": "auto | one (γ=1 all of epoch 0, public code) | schedule; auto = one under fastclip_code",
    "loss.u_reset": "auto | tiny (u<1e-35/inf/NaN -> g when γ<1, public code) | unseen; auto: tiny if fastclip_code",
    "loss.lr_tau": "learning rate of τ; null = train.lr",
    "loss.tau_scheduler": "τ learning-rate schedule: auto | step_thresh (÷3 once τ ≤ 0.03) | const | cosine",
    "loss.tau_min": "lower clamp of τ (the upper clamp is 1)",
    "loss.tau_beta1": "per-sample τ Adam β1 (fastclip_v2, isogclr)",
    "loss.tau_beta2": "per-sample τ Adam β2",
    "loss.tau_eps": "per-sample τ Adam ε",
    "optimizer.name": "adamw | lamb | lion | sgd (torch implementations, any ZeRO stage)",
    "optimizer.betas": "[β1, β2] of adamw / lamb / lion",
    "optimizer.eps": "ε of adamw / lamb",
    "optimizer.weight_decay": "decoupled weight decay (not on biases, norms, logit_scale)",
    "optimizer.momentum": "sgd momentum",
    "optimizer.nesterov": "sgd Nesterov momentum",
    "train.global_batch_size": "batch over all ranks (DeepSpeed's batch keys are derived from it)",
    "train.micro_batch_size": "per-rank micro-batch (null: the whole per-rank batch); smaller ones accumulate "
    "exactly: the loss still sees the whole global batch (features cached, forward replayed with its RNG state)",
    "train.epochs": "epochs to train",
    "train.max_steps": "optional cap on optimizer steps",
    "train.seed": "seed of model init, data order and augmentation",
    "train.lr": "peak learning rate",
    "train.lr_min": "final learning rate of the cosine schedule",
    "train.lr_scheduler": "cosine | const (both after a linear warm-up)",
    "train.warmup_steps": "linear warm-up steps",
    "train.save_every_steps": "checkpoint every N steps (0: only at the end and on SIGTERM/SIGUSR1)",
    "train.keep_checkpoints": "keep the newest K checkpoints (0: keep all)",
    "train.output_dir": "run directory (config, metrics.jsonl, tensorboard/, checkpoints/)",
    "train.log_every_steps": "log metrics every N steps",
    "train.max_nonfinite_steps": "abort after this many non-finite (skipped) steps in a row",
    "train.collective_timeout_s": "a rank that waits this long on a collective exits with an error",
    "train.init_from": "run directory whose latest complete checkpoint gives the starting weights (not its optimizer "
    "or data position: a new run)",
    "train.wandb_project": "log metrics to this wandb project (needs the wandb extra); null: no wandb",
    "train.wandb_mode": "online | offline (offline writes RUN_DIR/wandb/ without network; wandb sync uploads it)",
    "eval.data": "zero-shot / retrieval split: CLIP_benchmark's wds layout (DIR/test/nshards.txt) or, for "
    "classification, an ImageNet-style folder (DIR/val/<class>/<image>, class i = i-th sorted folder, with "
    "DIR/classnames.txt and DIR/zeroshot_classification_templates.txt); picked by what DIR holds; auto: the digits "
    "test split when data.train is the embedded digits, else none; null: no evaluation",
    "eval.every_steps": "evaluate every N steps (0: only at the end)",
    "eval.batch_size": "images per evaluation batch (the split's fixed batches are shared out over the ranks)",
}


def describe(defaults: dict[str, dict[str, Any]]) -> str:
    """``key (default): help`` lines for every key of ``defaults``."""
    lines = ["run-config keys (set in --config JSON or with --set KEY=VALUE; default in parentheses):"]
    for section, body in defaults.items():
        for key, value in body.items():
            dotted = f"{section}.{key}"
            lines.append(f"  {dotted} ({json.dumps(value)}): {KEY_HELP[dotted]}")
    return "\n".join(lines)
