"""End-to-end training runs: real DeepSpeed engines on 2 gloo ranks, checkpoints, resume, launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastclip_ds import digits
from fastclip_ds.multiproc import free_port

REPO = Path(__file__).parents[1]
TIMEOUT = 300


def small_run(root: Path, out: Path, *extra: str) -> list[str]:
    """A short run of the micro model on the digits shards; about 2 s of compute per step pair."""
    return [
        "--set",
        f"data.train={digits.train_pattern(root)}",
        "--set",
        f"eval.data={digits.eval_root(root)}",
        "--set",
        "model.config=fastclip-micro",
        "--set",
        "train.global_batch_size=32",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "train.log_every_steps=1",
        "--set",
        f"train.output_dir={out}",
        *extra,
    ]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}
    bin_dir = str(Path(sys.executable).parent)
    full_env["PATH"] = bin_dir + os.pathsep + full_env.get("PATH", "")
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-5000:], sep="\n")
    return proc


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            "-m",
            "fastclip_ds.train",
            *args,
        ]
    )


def metrics(out: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == kind]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "ds_config"), [(0, "cpu_zero0_fp32"), (2, "cpu_zero2_bf16"), (3, "cpu_zero3_fp32")])
def test_two_rank_deepspeed_run(digits_root: Path, tmp_path: Path, stage: int, ds_config: str) -> None:
    out = tmp_path / "run"
    proc = torchrun(2, small_run(digits_root, out, "--deepspeed_config", f"ds_configs/{ds_config}.json"))
    assert proc.returncode == 0
    train = metrics(out, "train")
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    assert all(x["loss"] == x["loss"] and x["samples_per_s"] > 0 for x in train)
    resolved = json.loads((out / "ds_config.json").read_text())
    assert resolved["zero_optimization"]["stage"] == stage and resolved["train_micro_batch_size_per_gpu"] == 16
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert 0.0 <= json.loads((out / "eval.json").read_text())["top1"] <= 1.0
    assert "zero-shot top-1" in proc.stdout


@pytest.mark.slow
def test_save_and_resume_latest(digits_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = torchrun(2, small_run(digits_root, out, "--set", "train.save_every_steps=2", "--set", "eval.data=null"))
    assert first.returncode == 0
    second = torchrun(
        2,
        small_run(digits_root, out, "--set", "train.max_steps=6", "--resume", "latest", "--set", "eval.data=null"),
    )
    assert second.returncode == 0
    assert "resumed from" in second.stdout and "step00000004" in second.stdout
    steps = [x["step"] for x in metrics(out, "train")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000006"
    kept = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert kept == ["step00000004", "step00000006"]  # train.keep_checkpoints = 2


def test_python_module_runs_world_size_one(digits_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "fastclip_ds.train", *small_run(digits_root, out, "--set", "train.max_steps=2")])
    assert proc.returncode == 0
    assert json.loads((out / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"] == 32


@pytest.mark.slow
def test_hostfile_launcher_no_ssh_mode(digits_root: Path, tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one machine, two ranks\nlocalhost slots=2\n")
    out = tmp_path / "run"
    proc = run(
        [
            "bash",
            "launchers/hostfile_deepspeed.sh",
            str(hostfile),
            *small_run(digits_root, out, "--set", "train.max_steps=2", "--set", "eval.data=null"),
        ],
        NODE_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    assert proc.returncode == 0
    assert json.loads((out / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"] == 16


def test_config_error_exits_before_any_process_group(tmp_path: Path) -> None:
    proc = run(
        [
            sys.executable,
            "-m",
            "fastclip_ds.train",
            "--set",
            "train.global_batch_size=33",
            "--set",
            f"train.output_dir={tmp_path}",
        ],
        WORLD_SIZE="2",
        RANK="0",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "config error: --set: train.global_batch_size: 33 is not divisible by the world size 2 (ranks)"
    )
