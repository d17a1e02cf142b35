"""Training: real DeepSpeed engines on gloo ranks (whole runs, and a Trainer driven step by step), checkpoints,
resume, launchers, and the Trainer's structure."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastclip_ds import digits, train
from fastclip_ds.multiproc import free_port, spawn
from fastclip_ds.optim import TAU_THRESH, TAU_THRESH_FACTOR

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
    ds = ["--deepspeed_config", f"ds_configs/{ds_config}.json"]
    proc = torchrun(2, small_run(digits_root, out, *ds, "--set", "eval.every_steps=2"))
    assert proc.returncode == 0
    train = metrics(out, "train")
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    assert all(x["loss"] == x["loss"] and x["samples_per_s"] > 0 for x in train)
    resolved = json.loads((out / "ds_config.json").read_text())
    assert resolved["zero_optimization"]["stage"] == stage and resolved["train_micro_batch_size_per_gpu"] == 16
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # Evals at steps 2 and 4, each once (the end of the run reuses step 4's instead of evaluating again); eval.json
    # is the one at the last step and names its split, as does the printed line.
    final = json.loads((out / "eval.json").read_text())
    assert [x["step"] for x in metrics(out, "eval")] == [2, 4] and proc.stdout.count("eval @ step 4:") == 1
    logged = [{k: v for k, v in x.items() if k not in ("step", "kind", "time")} for x in metrics(out, "eval")]
    assert logged[1] == final and final["data"] == str(digits.eval_root(digits_root)) and final["n"] == 397
    assert round(final["top1"] * 397) == pytest.approx(final["top1"] * 397, abs=1e-9)  # a count of 397 images
    assert f"top1 {final['top1']:.4f}" in proc.stdout and f"on {final['data']}" in proc.stdout.splitlines()[-1]
    assert "is deprecated" not in proc.stderr  # torch's FutureWarning about DeepSpeed's calls is silenced


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
    """``python -m fastclip_ds.train`` alone is one rank with the whole batch; on shards other than the embedded
    digits, ``eval.data`` left at ``auto`` evaluates nothing (no digits score for a model trained on other data)."""
    out = tmp_path / "run"
    args = small_run(digits_root, out, "--set", "train.max_steps=2", "--set", "eval.data=auto")
    proc = run([sys.executable, "-m", "fastclip_ds.train", *args])
    assert proc.returncode == 0
    assert json.loads((out / "ds_config.json").read_text())["train_micro_batch_size_per_gpu"] == 32
    assert json.loads((out / "config.json").read_text())["eval"]["data"] is None
    assert [x["step"] for x in metrics(out, "train")] == [1, 2] and metrics(out, "eval") == []
    assert not (out / "eval.json").exists() and "eval" not in proc.stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"


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


# ---------------------------------------------------------------- a Trainer driven in a spawned gloo rank


def trainer_worker(rank: int, world: int, root: str, out: str, sets: list[str], scenario: str) -> dict:
    """Build a :class:`train.Trainer` (fastclip-micro, real DeepSpeed engine at the default ZeRO-2 fp32) and run
    ``scenario``: ``tau`` records τ (read from the model's weights, not through the trainer) and the τ-group lr
    before the first step and after each of 6 steps; ``overflow`` makes every step an fp16 loss-scale overflow
    (DeepSpeed skips it and lowers its scale: mocked, there is no fp16 on CPU) and runs the whole loop."""
    from fastclip_ds.config import load_config, validate
    from fastclip_ds.engine import build_ds_config, default_ds_config

    cfg = load_config(None, [*small_run(Path(root), Path(out))[1::2], "data.num_workers=0", *sets])
    validate(cfg, world)
    ds_config = build_ds_config(default_ds_config(False), "<default>", global_batch=32, world_size=world, on_cuda=False)
    with train.Trainer(cfg, ds_config, Path(out), rank, world) as trainer:
        engine = trainer.engine

        def now() -> tuple[float, float]:
            return math.exp(-engine.module.logit_scale.item()), engine.get_lr()[-1]

        if scenario == "overflow":
            engine.fp16_enabled = engine.dynamic_loss_scale = lambda: True
            engine.step = lambda *_, **__: engine.zero_grad()  # the scaler found inf/NaN: no update
            engine.was_step_applied = lambda: False
            return {"result": trainer.run()}
        seen = [now()]
        for images, tokens, keys in trainer.open_loader():
            trainer.train_step(images, tokens, keys)
            seen.append(now())
            if len(seen) == 7:
                break
        return {"seen": seen, "groups": [g["name"] for g in engine.optimizer.param_groups]}


def test_step_thresh_reads_the_live_tau_and_tau_min_clamps(digits_root: Path, tmp_path: Path) -> None:
    """FastCLIP-v3's ``step_thresh`` through the trainer's own call order (forward, backward, engine.step, which
    steps the schedule): the lr of step t+1 is lr_tau/3 exactly when the τ the model holds after step t is ≤ 0.03.
    Catches a schedule fed a stale τ (it was two steps old: the loss's τ of the step before). τ starts at 0.0305
    and falls with lr_tau 0.05, so it crosses 0.03 and then meets ``loss.tau_min`` = 0.029, which must hold it
    (it was ignored: the clamp was a hard-coded τ ≥ 0.01)."""
    lr_tau, tau_min = 0.05, 0.029
    sets = ["loss.name=fastclip_v3", "loss.temperature=0.0305", f"loss.tau_min={tau_min}", f"loss.lr_tau={lr_tau}"]
    (result,) = spawn(1, trainer_worker, (str(digits_root), str(tmp_path), sets, "tau"), timeout=240)
    assert result["groups"][-1] == "logit_scale"
    seen = result["seen"]
    for tau, lr in seen:
        assert lr == pytest.approx(lr_tau * TAU_THRESH_FACTOR if tau <= TAU_THRESH else lr_tau, rel=1e-12), seen
    taus = [tau for tau, _ in seen]
    assert taus[0] > TAU_THRESH and min(taus) <= TAU_THRESH  # both regimes are exercised
    assert min(taus) == pytest.approx(tau_min, rel=1e-6) and all(t >= tau_min * (1 - 1e-6) for t in taus)


def test_fp16_loss_scale_overflows_do_not_abort(digits_root: Path, tmp_path: Path) -> None:
    """A skipped step of fp16's dynamic loss scaler is routine (the scaler lowers its scale and goes on): three in
    a row with ``train.max_nonfinite_steps=2`` finish the run, counted as ``overflow_steps``, not as non-finite
    steps. Catches overflow skips counted toward the abort (a healthy fp16 run could stop)."""
    sets = ["train.max_nonfinite_steps=2", "train.max_steps=3", "eval.data=null"]
    (result,) = spawn(1, trainer_worker, (str(digits_root), str(tmp_path), sets, "overflow"), timeout=240)
    assert result == {"result": {}}
    rows = metrics(tmp_path, "train")
    assert [(x["step"], x["overflow_steps"], x["nonfinite_steps"]) for x in rows] == [(1, 1, 0), (2, 2, 0), (3, 3, 0)]


# ---------------------------------------------------------------- structure


def _assigned(tree: ast.AST, owner: str = "self") -> set[str]:
    """Attributes of the variable ``owner`` that ``tree`` assigns to."""
    targets: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets += node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets.append(node.target)
    names = set()
    for target in targets:
        for t in ast.walk(target):
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == owner:
                names.add(t.attr)
    return names


def _classes(path: Path) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}


def test_every_trainer_attribute_is_created_in_init() -> None:
    """No attribute of a class in train.py is first created outside ``__init__`` (``Trainer.stop`` was created in
    ``run()`` but read by ``train_step``, so callers had to set it themselves)."""
    for name, cls in _classes(REPO / "fastclip_ds" / "train.py").items():
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        if "__init__" not in methods:
            continue
        created = _assigned(methods["__init__"])
        for method in methods.values():
            late = _assigned(method) - created
            assert not late, f"{name}.{method.name} creates {sorted(late)} outside __init__"


def test_update_parity_uses_only_the_documented_public_interface() -> None:
    """``launchers/update_parity.py`` reads only public, documented Trainer members and sets none (it used to set
    ``trainer.stop`` itself)."""
    tree = ast.parse((REPO / "launchers" / "update_parity.py").read_text())
    used = {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
        and n.value.id == "trainer"
    }  # fmt: skip
    cls = _classes(REPO / "fastclip_ds" / "train.py")["Trainer"]
    init = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    members = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)} | _assigned(init)
    doc = train.Trainer.__doc__ or ""
    assert used and used <= members, used - members
    assert all(not a.startswith("_") and (f"``{a}``" in doc or f":meth:`{a}`" in doc) for a in used), used
    assert _assigned(tree, "trainer") == set()


def test_package_silences_torch_deprecation_warnings_about_deepspeed_calls(tmp_path: Path) -> None:
    """torch warns that DeepSpeed's collectives are deprecated, once per rank; importing fastclip_ds silences that
    (even under ``-W default``), and only that: other FutureWarnings still show."""
    script = tmp_path / "warn.py"
    script.write_text(
        "import os, warnings, torch, torch.distributed as dist\n"
        "import fastclip_ds\n"
        f"os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='{free_port()}')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "dist.all_gather_into_tensor(torch.zeros(2), torch.zeros(2))\n"
        "warnings.warn('a warning of ours', FutureWarning)\n"
    )
    proc = subprocess.run([sys.executable, "-W", "default", str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is deprecated" not in proc.stderr and "a warning of ours" in proc.stderr
