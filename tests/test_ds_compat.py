"""The DeepSpeed version gate: a release outside ``ds_compat.SUPPORTED`` stops ``fastclip-ds train`` at start-up."""

from __future__ import annotations

from pathlib import Path

import deepspeed
import pytest
import torch

from fastclip_ds import ds_compat, train
from fastclip_ds.config import ConfigError


def test_installed_deepspeed_is_supported() -> None:
    """The suite tests the DeepSpeed it runs on: a different install fails here first, by name."""
    ds_compat.check_version()
    assert ds_compat.installed_version() == deepspeed.__version__


@pytest.mark.parametrize(
    ("version", "ok"),
    [("0.19.8", True), ("0.19.8+cu124", True), ("0.19.7", False), ("0.19.9", False), ("0.20.0", False), ("x", False)],
)
def test_version_range(monkeypatch: pytest.MonkeyPatch, version: str, ok: bool) -> None:
    """Only the tested release passes (a local build tag does not matter); neighbours and garbage do not."""
    monkeypatch.setattr(ds_compat, "SUPPORTED", ("0.19.8", "0.19.8"))
    monkeypatch.setattr(ds_compat, "installed_version", lambda: version)
    if ok:
        ds_compat.check_version()
    else:
        with pytest.raises(ConfigError, match=rf"^DeepSpeed {version} is installed; fastclip-ds supports DeepSpeed "):
            ds_compat.check_version()


def test_unsupported_deepspeed_stops_train_before_any_process_group(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Exit 2 with one line, before the process group: not a failure deep inside a resume."""

    def no_process_group(*args: object, **kwargs: object) -> None:
        raise AssertionError("init_distributed called despite an unsupported DeepSpeed")

    monkeypatch.setattr(ds_compat, "installed_version", lambda: "0.14.4")
    monkeypatch.setattr(deepspeed, "init_distributed", no_process_group)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    assert train.main(["--set", f"train.output_dir={tmp_path / 'run'}", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: DeepSpeed 0.14.4 is installed; fastclip-ds supports")
    assert "pip install deepspeed==0.19.8" in err
    assert not torch.distributed.is_initialized()
