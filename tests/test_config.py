"""Run-config and DeepSpeed-config errors: one line naming the key and the file, before any process group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastclip_ds import digits
from fastclip_ds.config import (
    KEY_HELP,
    ConfigError,
    check_environment,
    default_config,
    describe,
    load_config,
    parse_override,
    total_steps,
    validate,
)
from fastclip_ds.data import SPLITS
from fastclip_ds.engine import build_ds_config, load_ds_config, precision_dtype
from fastclip_ds.optim import build_optimizer


def write(tmp_path: Path, tree: object, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(tree))
    return path


def test_defaults_are_the_digits_demo() -> None:
    cfg = load_config()
    assert "digits" in cfg["data"]["train"] and cfg["model"]["config"] == "fastclip-tiny"
    assert cfg["loss"]["name"] == "openclip"
    validate(cfg, world_size=2)
    assert total_steps(cfg) == cfg["train"]["epochs"] * (cfg["data"]["num_samples"] // 64)


def test_file_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"lr": 1e-3, "global_batch_size": 32}, "loss": {"name": "fastclip_v3"}})
    cfg = load_config(path, ["train.lr=2e-3", "train.max_steps=7", "model.config=RN50"])
    assert cfg["train"]["lr"] == 2e-3 and cfg["train"]["global_batch_size"] == 32
    assert cfg["train"]["max_steps"] == 7 and cfg["model"]["config"] == "RN50"
    assert cfg["loss"]["name"] == "fastclip_v3"
    assert cfg.source("train.global_batch_size") == str(path) and cfg.source("train.lr") == "--set"
    assert total_steps(cfg) == 7


def test_saved_config_reloads_identically(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.epochs=3", "eval.data=null"])
    cfg.save(tmp_path / "config.json")
    again = load_config(tmp_path / "config.json")
    assert again.values == cfg.values


def test_override_values_parse_as_json_else_string() -> None:
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=[0.9, 0.98]") == ("a.b", [0.9, 0.98])
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=shards/{00..09}.tar") == ("a.b", "shards/{00..09}.tar")


BAD_RUN_CONFIGS = [
    ({"train": {"lrr": 1}}, "train.lrr: unknown key"),
    ({"trian": {"lr": 1}}, "trian.lr: unknown section"),
    ({"train": {"lr": "fast"}}, "train.lr: expected int or float, got 'fast'"),
    ({"train": {"global_batch_size": 64.5}}, "train.global_batch_size: expected int"),
    ({"train": {"epochs": True}}, "train.epochs: expected int, got True"),
    ({"train": {"max_steps": "10"}}, "train.max_steps: expected int"),
    ({"data": {"split": "node"}}, f"data.split: 'node' is not one of {', '.join(SPLITS)}"),  # choices from data
    ({"train": "fast"}, "train: expected an object"),
    ({"loss": {"lr_tau": "x"}}, "loss.lr_tau: expected int or float"),
]


@pytest.mark.parametrize(("tree", "message"), BAD_RUN_CONFIGS)
def test_bad_run_config_names_key_and_file(tmp_path: Path, tree: dict, message: str) -> None:
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


BAD_COMBINATIONS = [
    ({"train": {"global_batch_size": 63}}, 2, "train.global_batch_size: 63 is not divisible by the world size 2"),
    ({"train": {"global_batch_size": 4096}}, 1, "train.global_batch_size: 4096 exceeds data.num_samples"),
    ({"train": {"epochs": 0}}, 1, "train.epochs: must be positive"),
    ({"train": {"lr": -1.0}}, 1, "train.lr: must be >= 0"),
    ({"train": {"max_steps": 0}}, 1, "train.max_steps: must be positive or null"),
    ({"data": {"train": " "}}, 1, "data.train: empty shard pattern"),
]


@pytest.mark.parametrize(("tree", "world", "message"), BAD_COMBINATIONS)
def test_impossible_combinations(tmp_path: Path, tree: dict, world: int, message: str) -> None:
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError, match=f"^{path}: ") as err:
        validate(load_config(path), world)
    assert message in str(err.value)


def test_set_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--set: train.bogus: unknown key"):
        load_config(None, ["train.bogus=1"])
    with pytest.raises(ConfigError, match=r"^--set: 'train.lr': expected dotted.key=value"):
        load_config(None, ["train.lr"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": {"lr": }')
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 1"):
        load_config(bad)


def test_ds_config_batch_keys_are_derived(tmp_path: Path) -> None:
    user, source = load_ds_config(write(tmp_path, {"zero_optimization": {"stage": 2}}, "ds.json"), on_cuda=False)
    cfg = build_ds_config(user, source, global_batch=64, world_size=2, on_cuda=False)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        64,
        32,
        1,
    )


BAD_DS_CONFIGS = [
    ({"train_batch_size": 128}, "train_batch_size: 128 contradicts train.global_batch_size=64"),
    ({"optimizer": {"type": "Adam"}}, "optimizer: set by the run config's optimizer section"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler: set by train.lr"),
    ({"fp16": {"enabled": True}}, "fp16.enabled: fp16 needs a GPU"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage: 4 is not one of 0, 1, 2, 3"),
]


@pytest.mark.parametrize(("tree", "message"), BAD_DS_CONFIGS)
def test_bad_ds_config_names_key_and_file(tmp_path: Path, tree: dict, message: str) -> None:
    path = write(tmp_path, tree, "ds.json")
    user, source = load_ds_config(path, on_cuda=False)
    with pytest.raises(ConfigError, match=f"^{path}: ") as err:
        build_ds_config(user, source, global_batch=64, world_size=2, on_cuda=False)
    assert message in str(err.value)


def test_shipped_ds_configs_set_what_their_names_say() -> None:
    """Every ``ds_configs/DEVICE_zeroN_PRECISION.json`` is accepted and sets that ZeRO stage and precision; catches a
    file whose content drifted from its name (the README and launchers pick them by name)."""
    paths = sorted(Path(__file__).parents[1].glob("ds_configs/*.json"))
    assert len(paths) >= 6
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for path in paths:
        device, zero, precision = path.stem.split("_")
        user, source = load_ds_config(path, on_cuda=device == "gpu")
        cfg = build_ds_config(user, source, global_batch=64, world_size=2, on_cuda=device == "gpu")
        assert cfg["zero_optimization"]["stage"] == int(zero.removeprefix("zero")), path.name
        assert precision_dtype(cfg) == dtypes[precision], path.name
        assert cfg["train_micro_batch_size_per_gpu"] == 32, path.name


RELIABILITY_KEYS = [
    ({"data": {"max_bad_fraction": 1.5}}, "data.max_bad_fraction: must be in [0, 1], got 1.5"),
    ({"train": {"max_nonfinite_steps": 0}}, "train.max_nonfinite_steps: must be positive, got 0"),
    ({"train": {"collective_timeout_s": 0}}, "train.collective_timeout_s: must be positive, got 0"),
    ({"train": {"keep_checkpoints": -1}}, "train.keep_checkpoints: must be >= 0 (0 keeps all), got -1"),
    ({"train": {"collective_timeout_s": "10m"}}, "train.collective_timeout_s: expected int or float, got '10m'"),
]


@pytest.mark.parametrize(("tree", "message"), RELIABILITY_KEYS)
def test_reliability_keys_are_checked(tmp_path: Path, tree: dict, message: str) -> None:
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError) as err:
        validate(load_config(path), 1)
    assert str(err.value) == f"{path}: {message}"


def _environment_cases(tmp_path: Path) -> list[tuple[dict, str]]:
    shard = tmp_path / "data" / "000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ok = {"train": str(shard.parent / "{000000..000000}.tar")}
    return [
        (
            {"data": {"train": str(tmp_path / "gone" / "{000000..000002}.tar")}},
            f"data.train: '{tmp_path / 'gone' / '{000000..000002}.tar'}': 3 of 3 shard(s) missing, "
            f"first: {tmp_path / 'gone' / '000000.tar'}",
        ),
        (
            {"data": ok, "train": {"output_dir": str(blocker / "run")}},
            f"train.output_dir: '{blocker / 'run'}' is not writable (Not a directory)",
        ),
        (
            {"data": ok, "eval": {"data": str(tmp_path / "no_eval")}},
            f"eval.data: '{tmp_path / 'no_eval'}' is not a directory",
        ),
    ]


@pytest.mark.parametrize("case", range(3))
def test_environment_errors_name_key_value_and_file(tmp_path: Path, case: int) -> None:
    tree, message = _environment_cases(tmp_path)[case]
    tree.setdefault("train", {}).setdefault("output_dir", str(tmp_path / "run"))
    path = write(tmp_path, tree)
    cfg = load_config(path)
    validate(cfg, 1)
    with pytest.raises(ConfigError) as err:
        check_environment(cfg)
    assert str(err.value) == f"{path}: {message}"


def test_environment_ok_creates_the_output_dir(tmp_path: Path) -> None:
    shard = tmp_path / "000000.tar"
    shard.write_bytes(b"")
    tree = {"data": {"train": str(shard)}, "train": {"output_dir": str(tmp_path / "a" / "b")}, "eval": {"data": None}}
    assert check_environment(load_config(write(tmp_path, tree))) == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()


def test_every_key_is_explained_in_help() -> None:
    defaults = default_config()
    keys = {f"{s}.{k}" for s, body in defaults.items() for k in body}
    assert keys == set(KEY_HELP)
    text = describe(defaults)
    assert all(f"  {key} (" in text for key in keys)


def test_eval_data_auto_evaluates_only_the_split_made_for_the_training_data(tmp_path: Path) -> None:
    """``eval.data = auto`` is the digits test split only when training on the embedded digits shards; on the
    user's own shards there is no evaluation unless asked for (a digits score there would be about another task)."""
    demo = load_config()
    validate(demo, 1)
    assert demo["eval"]["data"] == str(digits.eval_root(digits.DEFAULT_ROOT))
    own = load_config(None, [f"data.train={tmp_path}/{{000000..000003}}.tar"])
    validate(own, 1)
    assert own["eval"]["data"] is None
    asked = load_config(None, [f"data.train={tmp_path}/{{000000..000003}}.tar", f"eval.data={tmp_path}"])
    validate(asked, 1)
    assert asked["eval"]["data"] == str(tmp_path)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"betas": [0.9, 1.5]}, "optimizer.betas"),
        ({"eps": -1.0}, "optimizer.eps"),
        ({"momentum": -0.5}, "optimizer.momentum"),
        ({"name": "sgd", "nesterov": True, "momentum": 0}, "optimizer.nesterov"),
    ],
)
def test_optimizer_section_checked_once(tmp_path: Path, section: dict, key: str) -> None:
    """The run config reports exactly what the optimizer's own check says (one rule set, not two that drift)."""
    with pytest.raises(ValueError) as direct:
        build_optimizer(torch.nn.Linear(2, 2), section, lr=1e-3, lr_tau=None, train_logit_scale=False)
    assert str(direct.value).startswith(f"{key}: ")
    path = write(tmp_path, {"optimizer": section})
    with pytest.raises(ConfigError) as err:
        validate(load_config(path), 1)
    assert str(err.value) == f"{path}: {direct.value}"


def _model_config_cases(tmp_path: Path) -> list[tuple[str, str]]:
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"embed_dim": 16}))
    return [
        (
            "no-such-model",
            "unknown model 'no-such-model': not an open_clip model name nor a path to a model-config .json",
        ),
        (str(tmp_path / "gone.json"), f"model config file not found: {tmp_path / 'gone.json'}"),
        (str(partial), f"model config {partial}: missing key(s) vision_cfg, text_cfg (open_clip model-config schema)"),
    ]


@pytest.mark.parametrize("case", range(3))
def test_bad_model_config_is_an_environment_error(tmp_path: Path, case: int) -> None:
    spec, message = _model_config_cases(tmp_path)[case]
    cfg = load_config(None, [f"model.config={spec}", f"train.output_dir={tmp_path / 'run'}"])
    validate(cfg, 1)
    with pytest.raises(ConfigError) as err:
        check_environment(cfg)
    assert str(err.value) == f"--set: model.config: {message}"


def test_bad_model_config_exits_2_with_one_line_before_any_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: a config error is one line and exit code 2, before any process group (was: a traceback, exit 1)."""
    from fastclip_ds.train import main

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", "1")
    assert main(["--set", "model.config=no-such-model", "--set", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["config error: --set: model.config: unknown model 'no-such-model': not an open_clip model name "
                   "nor a path to a model-config .json"]  # fmt: skip
    assert not torch.distributed.is_initialized()


def test_key_help_has_one_source() -> None:
    """Key help lives in ``KEY_HELP`` (shown by ``--help``); the README points there instead of keeping a copy."""
    lines = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    rows = [line for line, below in zip(lines, [*lines[1:], ""], strict=True) if not below.startswith("|---")]
    copied = [key for key in KEY_HELP if any(row.startswith(f"| `{key}`") for row in rows)]
    assert copied == [] and "`fastclip-ds train --help` lists every run-config key" in "\n".join(lines)
