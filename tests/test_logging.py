"""The run's ``out.log`` and the optional wandb run."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fastclip_ds import digits, train
from fastclip_ds.logs import LOG_NAME, RunLog

REPO = Path(__file__).parents[1]
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def run_train(root: Path, out: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    """A 3-step fastclip-micro digits run (``python -m fastclip_ds.train``, world size 1), logging every step."""
    pairs = [
        f"data.train={digits.train_pattern(root)}",
        f"eval.data={digits.eval_root(root)}",
        "model.config=fastclip-micro",
        "train.global_batch_size=32",
        "train.max_steps=3",
        "train.warmup_steps=1",
        "train.log_every_steps=1",
        f"train.output_dir={out}",
        *sets,
    ]
    cmd = [sys.executable, "-m", "fastclip_ds.train", *(x for p in pairs for x in ("--set", p))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_out_log_holds_the_runs_progress_lines(digits_root: Path, tmp_path: Path) -> None:
    """A whole run writes ``RUN_DIR/out.log`` with a progress line per logged step, the final progress bar state (no
    '\\r' redraws), the eval line and the closing summary: every stdout line from the first step on (lines printed
    before the run directory is known, at import, cannot be in it). Catches a log that is never written, misses stdout
    or stderr, or fills with the progress bar's in-place redraws."""
    out = tmp_path / "run"
    proc = run_train(digits_root, out)
    text = (out / LOG_NAME).read_text()
    lines = text.splitlines()
    assert "\r" not in text
    for step in (1, 2, 3):
        assert any(line.startswith(f"step {step}/3 epoch 0: loss ") for line in lines), text
    assert any(line.startswith("train: 100%") and "3/3" in line for line in lines), text
    assert any(line.startswith("eval @ step 3: top1 ") for line in lines), text
    assert lines[-1].startswith("eval: top1 ") and lines[-1].endswith(f"(run {out})")
    console = [x.rsplit("\r", 1)[-1] for x in proc.stdout.splitlines()]
    first = next(i for i, x in enumerate(console) if x.startswith("step 1/3"))
    assert [x for x in console[first:] if x.strip()] == [x for x in lines if x in console[first:]]  # all stdout since


def test_run_log_keeps_rank_0_console_and_every_ranks_warnings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Rank 0's prints go to out.log (a '\\r'-redrawn line as its last state), another rank's prints do not, but its
    Python warnings and WARNING log records (DeepSpeed's logger included) do, prefixed with the rank; close restores
    stdout. Catches warnings of ranks > 0 lost, or every rank's console copied into one file."""
    rank1 = RunLog(tmp_path, rank=1)
    print("rank 1 console line")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("slow disk", UserWarning, stacklevel=1)
    logging.getLogger("DeepSpeed").warning("ds says %s", "careful")
    rank1.close()
    rank0 = RunLog(tmp_path, rank=0)
    stdout = sys.stdout
    print("10%\r50%\r100% done")
    rank0.close()
    assert sys.stdout is not stdout
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert "rank 1 console line" not in lines
    assert any(line.startswith("rank 1: ") and line.endswith("UserWarning: slow disk") for line in lines), lines
    assert "rank 1: WARNING DeepSpeed: ds says careful" in lines
    assert lines[-1] == "100% done"
    assert "rank 1 console line" in capsys.readouterr().out  # the console itself is unchanged


@pytest.mark.skipif(
    not HAS_WANDB, reason="wandb is an optional extra (pip install 'fastclip-ds[wandb]'), not installed"
)
def test_wandb_offline_run_writes_its_files(digits_root: Path, tmp_path: Path) -> None:
    """``train.wandb_project`` with ``train.wandb_mode=offline``: the run needs no network and leaves an offline run
    under ``RUN_DIR/wandb`` (its ``.wandb`` data file). Catches wandb never started or started online."""
    out = tmp_path / "run"
    run_train(digits_root, out, "train.wandb_project=fastclip-ds-test", "train.wandb_mode=offline")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    data = list(runs[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed here: the missing-package error cannot occur")
def test_wandb_without_the_package_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Asking for wandb without the package: one-line config error naming the key and the extra, exit 2."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    assert train.main(["--set", "train.wandb_project=p", "--set", f"train.output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "config error: --set: train.wandb_project: needs the wandb package: pip install 'fastclip-ds[wandb]'"
    ]
