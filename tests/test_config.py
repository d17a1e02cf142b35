"""Run-config and DeepSpeed-config errors: one line naming the key and the file, before any process group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
from fastclip_ds.engine import build_ds_config, load_ds_config


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
    ({"data": {"split": "node"}}, "data.split: 'node' is not one of global, rank"),
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


def test_shipped_ds_configs_are_valid() -> None:
    for path in sorted(Path(__file__).parents[1].glob("ds_configs/*.json")):
        user, source = load_ds_config(path, on_cuda=path.name.startswith("gpu"))
        build_ds_config(user, source, global_batch=64, world_size=2, on_cuda=path.name.startswith("gpu"))


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
