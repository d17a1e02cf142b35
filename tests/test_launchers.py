"""The launchers as a user runs them. ``launchers/slurm.sbatch`` under bash with a fake ``srun``/``scontrol`` on PATH:
the torchrun command (checked by torchrun's own parser) and the ``#SBATCH`` lines, then real jobs through it (the fake
srun starts one torchrun per "node" on this machine) stopped by SIGUSR1 and requeued with ``--resume auto``.
``launchers/hostfile_deepspeed.sh``: DeepSpeed's own runner with a fake ``ssh``/``pdsh`` (the command pdsh would run
on every node), and the no-ssh mode for real with ``ds_configs/cpu_zero1_fp32.json``."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.run import get_args_parser

from fastclip_ds.multiproc import free_port
from fastclip_ds.train import build_parser

from .test_reliability import ds
from .test_train import REPO, metrics, run, small_run

FAKES = {
    # records its arguments (NUL-separated); with FAKE_SRUN_EXEC=1 runs the command once per node, as srun does
    "srun": """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_LOG/srun.args"
[[ "${FAKE_SRUN_EXEC:-0}" == 1 ]] || exit 0
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
""",
    "scontrol": """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && tr , '\\n' <<< "$3"
""",
    # DeepSpeed's runner checks passwordless ssh, asks the first host for its address, then runs pdsh
    "ssh": """#!/usr/bin/env bash
printf '%s\\0' "$@" >> "$FAKE_LOG/ssh.args"
[[ "${*: -2}" == "hostname -I" ]] && echo "10.1.2.3 10.9.9.9"
exit 0
""",
    "pdsh": """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_LOG/pdsh.args"
""",
}
MARK = "FASTCLIP_TEST_JOB"  # in the environment of every process a test starts, to find them in /proc
USR1_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def fakes(tmp_path: Path) -> dict[str, str]:
    """The fake commands on PATH (recording into ``tmp_path``) as environment variables for :func:`run`."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(tmp_path), MARK: str(tmp_path)}


def recorded(tmp_path: Path, name: str) -> list[str]:
    return (tmp_path / f"{name}.args").read_text().split("\0")[:-1]


def slurm_env(tmp_path: Path, nodes: int, gpus: int, nodelist: str, **extra: str) -> dict[str, str]:
    job = {"SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": str(nodes), "SLURM_JOB_ID": "4242"}
    return fakes(tmp_path) | job | {"SLURM_GPUS_ON_NODE": str(gpus), "MASTER_PORT": str(free_port())} | extra


def test_slurm_sbatch_command(tmp_path: Path) -> None:
    """Catches a flag torchrun does not know, a lost ``--resume auto`` or SIGUSR1 forwarding, a wrong rendezvous
    endpoint, and ``#SBATCH`` lines that sbatch would not read (after the first command)."""
    env = slurm_env(tmp_path, nodes=2, gpus=4, nodelist="node-a,node-b")
    assert run(["bash", "launchers/slurm.sbatch", "--config", "run.json"], **env).returncode == 0
    srun = recorded(tmp_path, "srun")
    assert srun[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    torchrun = get_args_parser().parse_args(srun[2:])  # torchrun's own parser: a misspelt flag fails here
    assert (torchrun.nnodes, torchrun.nproc_per_node) == ("2", "4")  # node ranks come from the c10d rendezvous
    rendezvous = (torchrun.rdzv_backend, torchrun.rdzv_id, torchrun.rdzv_endpoint)
    assert rendezvous == ("c10d", "4242", f"node-a:{env['MASTER_PORT']}")  # the first node of the job
    assert torchrun.signals_to_handle == USR1_SIGNALS and torchrun.shutdown_timeout == 100
    assert torchrun.module and torchrun.training_script == "fastclip_ds.train"
    train = build_parser().parse_args(torchrun.training_script_args)
    assert train.resume == "auto" and train.config == "run.json"
    # sbatch reads #SBATCH lines up to the first command
    header = Path(REPO / "launchers" / "slurm.sbatch").read_text().split("\nset -euo pipefail")[0].splitlines()
    directives = [line.split(None, 1)[1] for line in header if line.startswith("#SBATCH")]
    assert "--signal=USR1@120" in directives and "--requeue" in directives
    assert all(line.startswith("#") for line in header)


def test_hostfile_launcher_pdsh_command(tmp_path: Path) -> None:
    """Catches hosts, master address or port, ``--module`` or train arguments lost on the way to every node."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=2\nworker-2 slots=2\n")
    (tmp_path / "ds_env").write_text("OMP_NUM_THREADS=1\n")
    env = fakes(tmp_path) | {"MASTER_PORT": "29612", "DS_ENV_FILE": str(tmp_path / "ds_env")}
    proc = run(["bash", "launchers/hostfile_deepspeed.sh", str(hostfile), "--config", "run.json"], **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert recorded(tmp_path, "ssh")[-3:] == ["worker-1", "hostname", "-I"]  # the master address, asked by ssh
    pdsh = recorded(tmp_path, "pdsh")
    assert pdsh[:5] == ["-S", "-f", "1024", "-w", "worker-1,worker-2"]
    exports, cd, *command = pdsh[5:]
    assert "export OMP_NUM_THREADS=1" in exports  # from $DS_ENV_FILE: DeepSpeed's way to pass variables
    assert cd == f"cd {REPO};"
    assert Path(command[0]).parent == Path(sys.executable).parent  # this venv's python, on every node
    assert command[1:4] == ["-u", "-m", "deepspeed.launcher.launch"] and command[5:] == [
        "--node_rank=%n", "--master_addr=10.1.2.3", "--master_port=29612", "--module",
        "--enable_each_rank_log=None",  # DeepSpeed 0.19.8 passes its default string on
        "fastclip_ds.train", "--config", "run.json",
    ]  # fmt: skip
    world = json.loads(base64.urlsafe_b64decode(command[4].removeprefix("--world_info=")))
    assert world == {"worker-1": [0, 1], "worker-2": [0, 1]}


def processes(marker: str) -> list[tuple[int, int, dict[str, str], list[str]]]:
    """``(pid, parent pid, environment, argv)`` of the live processes whose environment holds ``MARK=marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode().split("\0") if "=" in v)
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue  # exited meanwhile, or not ours
        if env.get(MARK) == marker:
            found.append((int(entry.name), parent, env, argv))
    return found


def rank_main(rank: int) -> Callable[[list], list[int]]:
    """The main process of ``rank`` (its DataLoader workers share its environment, not its parent's)."""

    def pick(procs: list) -> list[int]:
        with_rank = {pid for pid, _, env, _ in procs if "RANK" in env}
        return [pid for pid, parent, env, _ in procs if env.get("RANK") == str(rank) and parent not in with_rank]

    return pick


def job_step(procs: list) -> list[int]:
    """Every python process of the job step (torchrun agents, ranks, DataLoader workers), as slurm's --signal."""
    return [pid for pid, _, _, argv in procs if Path(argv[0]).name.startswith("python")]


def run_and_signal(cmd: list[str], env: dict[str, str], out: Path, after_step: int, pick: Callable) -> tuple:
    """Run ``cmd``; once training has logged ``after_step``, SIGUSR1 to the processes ``pick`` chooses."""
    done: list[subprocess.CompletedProcess[str]] = []
    thread = threading.Thread(target=lambda: done.append(run(cmd, **env)))
    thread.start()
    targets: list[int] = []
    while thread.is_alive() and not targets:
        try:
            reached = any(x["step"] >= after_step for x in metrics(out, "train"))
        except (FileNotFoundError, json.JSONDecodeError):
            reached = False
        if reached:
            targets = pick(processes(env[MARK]))
            for pid in targets:
                os.kill(pid, signal.SIGUSR1)
        time.sleep(0.05)
    thread.join()
    return done[0], targets


def stopped_at(proc: subprocess.CompletedProcess[str], out: Path) -> int:
    step = int(re.search(r"stopped by SIGUSR1 after step (\d+)", proc.stdout).group(1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{step:08d}"
    return step


@pytest.mark.slow  # two short 2-rank jobs
def test_slurm_job_stopped_by_sigusr1_resumes_with_resume_auto(digits_root: Path, tmp_path: Path) -> None:
    """Catches a stop that only the signalled rank takes (a hang or a lost rank), torchrun dying on SIGUSR1 instead
    of forwarding it, a save left incomplete, and a requeued job that starts over instead of resuming."""
    out = tmp_path / "run"
    args = small_run(digits_root, out, "--set", "eval.data=null", "--set", "train.max_steps=8", *ds("cpu_zero2_fp32"))
    cmd = ["bash", "launchers/slurm.sbatch", *args]

    def job() -> dict[str, str]:  # two "nodes" of one rank each, on this machine; a fresh rendezvous port per start
        return slurm_env(tmp_path, nodes=2, gpus=1, nodelist="127.0.0.1,localhost", FAKE_SRUN_EXEC="1")

    # SIGUSR1 on rank 1 alone: every rank finishes the step, saves, exits 0
    first, targets = run_and_signal(cmd, job(), out, after_step=1, pick=rank_main(1))
    assert len(targets) == 1 and first.returncode == 0, first.stderr[-3000:]
    k1 = stopped_at(first, out)
    assert json.loads((out / "checkpoints" / f"step{k1:08d}" / "complete.json").read_text())["world_size"] == 2

    # requeued: --resume auto continues from k1; then SIGUSR1 to the whole step as slurm's --signal sends it:
    # torchrun forwards it to its ranks (--signals-to-handle), which save and exit 0; torchrun then exits 1
    second, targets = run_and_signal(cmd, job(), out, after_step=k1 + 1, pick=job_step)
    assert len(targets) >= 4 and f"resumed from {out / 'checkpoints' / f'step{k1:08d}'}" in second.stdout
    assert "SignalException" in second.stderr and "ChildFailedError" not in second.stderr, second.stderr[-3000:]
    k2 = stopped_at(second, out)
    assert k1 < k2 < 8
    assert [x["step"] for x in metrics(out, "train")] == list(range(1, k2 + 1))  # each step once, across both


@pytest.mark.slow  # one short 2-rank run
def test_hostfile_no_ssh_mode_trains_two_ranks_with_zero1(digits_root: Path, tmp_path: Path) -> None:
    """Catches a no-ssh launch that does not give 2 ranks, and a ZeRO-1 config that does not partition the optimizer."""
    hostfile, out = tmp_path / "hostfile", tmp_path / "run"
    hostfile.write_text("localhost slots=2\n")
    args = small_run(digits_root, out, "--set", "eval.data=null", *ds("cpu_zero1_fp32"))
    env = {"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = run(["bash", "launchers/hostfile_deepspeed.sh", str(hostfile), *args], **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = metrics(out, "train")
    assert [x["step"] for x in train] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(x["loss"])) for x in train)
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 1
    # ZeRO-1: each of the 2 ranks holds the fp32 master copy and Adam state of about half the parameters
    tag = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    model = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    n_params = sum(p.numel() for p in model.values() if p.is_floating_point())
    parts = [
        torch.load(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)["optimizer_state_dict"]
        for r in (0, 1)
    ]
    sizes = [sum(t.numel() for t in p["single_partition_of_fp32_groups"]) for p in parts]
    assert n_params <= sum(sizes) < n_params + 64 and max(sizes) < 0.6 * n_params, (sizes, n_params)
