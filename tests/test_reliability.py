"""Reliability: exact and elastic resume, crashes during and after saves, signals, a dead rank, bad data, NaN steps.

Faults are injected by a test-only driver script (written to the test's tmp dir) that patches the trainer inside
the child process and then runs ``fastclip_ds.train.main``: the production code has no fault hooks.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from fastclip_ds.export import export_checkpoint
from fastclip_ds.losses import build_loss, resolve_config
from fastclip_ds.multiproc import free_port

from .test_train import REPO, TIMEOUT, metrics, run, small_run

DRIVER = '''
"""Run fastclip_ds.train with the fault named by $FAULT (kind:step) injected into this process."""
import os, signal, sys, time

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from fastclip_ds import checkpoint, train

faults = dict(f.split(":", 1) for f in os.environ.get("FAULT", "").split(";") if f)  # "kind:arg;kind:arg"
rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
step_fn, save_fn, ds_save = train.Trainer.train_step, train.Trainer.save, DeepSpeedEngine.save_checkpoint


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward (a finite loss whose gradients are not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def before_step(self, *args):
    step = self.pos.global_step + 1
    if faults.get("sigterm") == str(step) and rank == world - 1:
        os.kill(os.getpid(), signal.SIGTERM)
    if faults.get("sigterm_tree") == str(step):  # as a scheduler does: this process and its DataLoader workers
        children = open(f"/proc/self/task/{os.getpid()}/children").read().split()
        for pid in [*map(int, children), os.getpid()]:
            os.kill(pid, signal.SIGTERM)
    if faults.get("die") == str(step) and rank == world - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if faults.get("hang") == str(step) and rank == world - 1:
        time.sleep(3600)
    kind = next((k for k in ("nan", "nangrad") if str(step) in faults.get(k, "").split(",")), None)
    if kind is not None:
        forward, poison = self.loss_fn.forward, (lambda x: x * float("nan")) if kind == "nan" else NanGrad.apply
        self.loss_fn.forward = lambda *a: {**(r := forward(*a)), "loss": poison(r["loss"])}
        try:
            return step_fn(self, *args)
        finally:
            del self.loss_fn.forward
    return step_fn(self, *args)


def after_save(self):
    tag = save_fn(self)
    if faults.get("kill_after_save") == str(self.pos.global_step):
        os.kill(os.getpid(), signal.SIGKILL)
    return tag


def in_save(self, save_dir, tag=None, **kwargs):
    out = ds_save(self, save_dir, tag=tag, **kwargs)
    if "kill_in_save" in faults and tag == checkpoint.tag_for(int(faults["kill_in_save"])):
        os.kill(os.getpid(), signal.SIGKILL)  # DeepSpeed's files written; loss state, RNG, complete.json not
    return out


train.Trainer.train_step, train.Trainer.save, DeepSpeedEngine.save_checkpoint = before_step, after_save, in_save
sys.exit(train.main())
'''

FASTCLIP = ["--set", "loss.name=fastclip_v3", "--set", "eval.data=null", "--set", "train.max_steps=6"]


def launch(tmp_path: Path, nproc: int, args: list[str], fault: str = "") -> subprocess.CompletedProcess[str]:
    """The driver on ``nproc`` ranks (torchrun for 2, plain python for 1) with ``FAULT=fault`` (``kind:step``, several
    joined by ``;``)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    if nproc == 1:
        return run([sys.executable, str(driver), *args], FAULT=fault)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return run([*cmd, "--master_port", str(free_port()), str(driver), *args], FAULT=fault)


def weights(run_dir: Path, tag: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = export_checkpoint(run_dir, tmp_path / f"{run_dir.name}_{tag}.pt", tag)
    return torch.load(out, weights_only=True)["state_dict"]


def loss_table(ckpt: Path) -> torch.Tensor:
    """The full per-sample table (key k -> row k) from a tag's loss-state shards."""
    files = sorted((ckpt / "loss_state").glob("shard_*_of_*.pt"))
    blobs = [torch.load(f, weights_only=True) for f in files]
    table = torch.empty(blobs[0]["n"], blobs[0]["table"].shape[1])
    for rank, blob in enumerate(blobs):
        table[rank :: len(blobs)] = blob["table"]
    return table


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float reordering (1 vs 2 ranks); the attention key bias is left out: its gradient is zero,
    so Adam turns rounding there into lr-sized steps (see test_world_invariance)."""
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("attn.in_proj_bias"):
            w = x.numel() // 3
            x, y = torch.cat([x[:w], x[2 * w :]]), torch.cat([y[:w], y[2 * w :]])
        assert (x - y).norm() <= 1e-4 * x.norm() + 1e-12, name


def ds(name: str) -> list[str]:
    return ["--deepspeed_config", f"ds_configs/{name}.json"]


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest, digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted 2-rank fastclip_v3 run of 6 steps keeping the checkpoints at steps 2, 4 and 6, with the
    DeepSpeed config named by the indirect parameter."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    args = small_run(
        digits_root, out, *FASTCLIP, *ds(request.param), "--set", "train.save_every_steps=2", "--set",
        "train.keep_checkpoints=0",
    )  # fmt: skip
    assert launch(tmp, 2, args).returncode == 0
    return out


def assert_same_final_state(out: Path, reference: Path, tmp_path: Path) -> None:
    """Steps 1..6 each logged once, and the step-6 weights and per-sample state equal ``reference``'s bit for bit."""
    assert [x["step"] for x in metrics(out, "train")] == [1, 2, 3, 4, 5, 6]
    ours, theirs = weights(out, "step00000006", tmp_path), weights(reference, "step00000006", tmp_path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    u, u_ref = loss_table(out / "checkpoints" / "step00000006"), loss_table(reference / "checkpoints" / "step00000006")
    assert torch.isfinite(u_ref).any() and torch.equal(u, u_ref)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["cpu_zero2_fp32"], indirect=True)
def test_sigkill_then_sigterm_then_resume_is_bit_identical(reference: Path, digits_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = small_run(digits_root, out, *FASTCLIP, *ds("cpu_zero2_fp32"), "--set", "train.save_every_steps=2")
    killed = launch(tmp_path, 2, args, "kill_after_save:2")
    assert killed.returncode != 0 and (out / "checkpoints" / "latest").read_text().strip() == "step00000002"

    stopped = launch(tmp_path, 2, [*args, "--resume", "latest"], "sigterm:4")  # rank 1 only gets the signal
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "stopped by SIGTERM after step 4" in stopped.stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert not (out / "eval.json").exists()

    assert launch(tmp_path, 2, [*args, "--resume", "latest"]).returncode == 0
    assert_same_final_state(out, reference, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["cpu_zero2_fp32", "cpu_zero3_fp32"], indirect=True)
def test_elastic_two_to_one_to_two_ranks(reference: Path, digits_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step00000002", out / "checkpoints" / "step00000002")
    stage = json.loads((reference / "ds_config.json").read_text())["zero_optimization"]["stage"]
    args = small_run(digits_root, out, *FASTCLIP, *ds(f"cpu_zero{stage}_fp32"), "--set", "train.keep_checkpoints=0")

    one = launch(tmp_path, 1, [*args, "--resume", "step00000002"], "sigterm:4")  # 2 -> 1 rank, stop after step 4
    assert one.returncode == 0, one.stderr[-2000:]
    assert (out / "checkpoints" / "universal" / "step00000002" / "zero").is_dir()
    assert_close_weights(weights(out, "step00000004", tmp_path), weights(reference, "step00000004", tmp_path))

    assert launch(tmp_path, 2, [*args, "--resume", "latest"]).returncode == 0  # 1 -> 2 ranks
    assert_close_weights(weights(out, "step00000006", tmp_path), weights(reference, "step00000006", tmp_path))
    u, u_ref = loss_table(out / "checkpoints" / "step00000006"), loss_table(reference / "checkpoints" / "step00000006")
    seen = torch.isfinite(u_ref)
    assert seen.any() and torch.equal(torch.isfinite(u), seen)
    assert torch.allclose(u[seen], u_ref[seen], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_kill_during_save_resumes_from_the_previous_checkpoint(digits_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = small_run(digits_root, out, "--set", "eval.data=null", "--set", "train.save_every_steps=2")
    killed = launch(tmp_path, 1, [*args, "--resume", "auto"], "kill_in_save:4")  # no checkpoint yet: fresh
    ckpt = out / "checkpoints"
    assert killed.returncode != 0 and (ckpt / "latest").read_text().strip() == "step00000002"
    assert (ckpt / "step00000004").is_dir() and not (ckpt / "step00000004" / "complete.json").exists()

    resumed = launch(tmp_path, 1, [*args, "--resume", "auto"])
    assert resumed.returncode == 0
    assert "removed incomplete checkpoint" in resumed.stdout and "resumed from" in resumed.stdout
    assert "step00000002 at epoch 0 step 2" in resumed.stdout
    assert (ckpt / "latest").read_text().strip() == "step00000004"
    assert (ckpt / "step00000004" / "complete.json").is_file()
    assert [x["step"] for x in metrics(out, "train")] == [1, 2, 3, 4, 3, 4]


def test_nan_steps_are_skipped_then_abort_keeps_the_last_checkpoint(digits_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = small_run(
        digits_root,
        out,
        *FASTCLIP,
        "--set",
        "train.save_every_steps=3",
        "--set",
        "train.max_nonfinite_steps=2",
    )
    proc = launch(tmp_path, 1, args, "nan:2,5,6")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: 2 non-finite steps in a row (train.max_nonfinite_steps=2) at step 6; last good checkpoint: step00000003"
    )
    assert "step 2: non-finite loss or gradient, step skipped" in proc.stdout
    train = {x["step"]: x for x in metrics(out, "train")}
    assert [train[s]["nonfinite_steps"] for s in (1, 2, 3, 4, 5)] == [0, 1, 1, 1, 2]
    assert math.isnan(train[2]["loss"]) and math.isfinite(train[3]["loss"])
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000003"


@pytest.mark.parametrize("ds_config", ["cpu_zero0_fp32", "cpu_zero2_fp32"])
def test_nan_gradient_skips_the_optimizer_step(digits_root: Path, tmp_path: Path, ds_config: str) -> None:
    """ZeRO-0: our gradient check skips the step; ZeRO-2: DeepSpeed's overflow check does."""
    out = tmp_path / "run"
    args = small_run(digits_root, out, *FASTCLIP, *ds(ds_config))
    proc = launch(tmp_path, 1, [*args, "--set", "train.max_steps=3"], "nangrad:2")
    assert proc.returncode == 0
    train = metrics(out, "train")
    assert [x["nonfinite_steps"] for x in train] == [0, 1, 1] and all(math.isfinite(x["loss"]) for x in train)
    final = weights(out, "step00000003", tmp_path)
    assert all(torch.isfinite(v).all() for v in final.values())


def test_loss_state_update_waits_for_commit() -> None:
    cfg = resolve_config({"name": "fastclip_v3"})
    x = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    t = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    scale, keys = torch.tensor([math.log(1 / 0.07)], dtype=torch.float64), torch.arange(6)
    eager = build_loss(cfg, dataset_size=10, steps_per_epoch=5, state_dtype=torch.float64)
    deferred = build_loss(cfg, dataset_size=10, steps_per_epoch=5, state_dtype=torch.float64)
    deferred.defer_updates = True
    eager(x, t, scale, keys)
    before = deferred.state.table.clone()
    deferred(x, t, scale, keys)
    deferred.discard()
    assert torch.equal(deferred.state.table, before) and deferred.steps_seen == 0
    deferred(x, t, scale, keys)
    deferred.commit()
    assert torch.equal(deferred.state.table, eager.state.table) and deferred.steps_seen == eager.steps_seen == 1
    assert not torch.equal(before, eager.state.table)


def test_sigterm_to_the_process_tree_saves_and_exits_zero(digits_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = launch(tmp_path, 1, small_run(digits_root, out, "--set", "eval.data=null"), "sigterm_tree:2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped by SIGTERM after step 2" in proc.stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "timeout"), [("die:2", 30), ("hang:2", 15)])
def test_lost_rank_makes_the_other_exit_with_a_clear_message(
    digits_root: Path, tmp_path: Path, fault: str, timeout: int
) -> None:
    """Rank 1 is killed (the peer's connection resets) or hangs (the collective times out) before step 2."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    extra = ["--set", "eval.data=null", "--set", f"train.collective_timeout_s={timeout}"]
    args = small_run(digits_root, tmp_path / "run", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "FAULT": fault, "WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [
        subprocess.Popen(
            [sys.executable, str(driver), *args],
            cwd=REPO,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
            text=True,
        )
        for r in range(2)
    ]
    try:
        _, err0 = procs[0].communicate(timeout=TIMEOUT)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1
    last = err0.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: a collective failed: another rank died or did not answer within "), last
    assert f"train.collective_timeout_s={timeout}" in last


def _rewrite_tar(src: Path, dst: Path, edit: dict[str, bytes]) -> None:
    """Copy a shard, replacing the payload of the members named in ``edit``."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            data = edit.get(member.name, tin.extractfile(member).read())
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))


def _bad_shards(root: Path, dst: Path) -> str:
    """Three digits train shards: one intact, one with an undecodable image and an empty caption, one truncated."""
    urls = sorted((root / "train").glob("*.tar"))[:3]
    dst.mkdir()
    for url in urls:
        shutil.copy(url, dst / url.name)
    with tarfile.open(urls[1]) as tar:
        names = tar.getnames()
    image = next(n for n in names if n.endswith((".jpg", ".png")))
    caption = next(n for n in names if n.endswith(".txt") and n.split(".")[0] != image.split(".")[0])
    _rewrite_tar(urls[1], dst / urls[1].name, {image: b"not an image", caption: b""})
    with tarfile.open(urls[2]) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2]
    (dst / urls[2].name).write_bytes(urls[2].read_bytes()[: middle.offset_data + 10])  # truncated inside a member
    return str(dst / f"{{{urls[0].stem}..{urls[-1].stem}}}.tar")


@pytest.mark.slow
def test_bad_data_is_counted_then_too_much_stops(digits_root: Path, tmp_path: Path) -> None:
    pattern = _bad_shards(digits_root, tmp_path / "shards")
    out = tmp_path / "run"
    # split=global: every shard is read within the 4 steps (the streams split reads them in parallel byte ranges)
    args = small_run(digits_root, out, "--set", "eval.data=null", "--set", f"data.train={pattern}")
    args += ["--set", "data.split=global"]
    ok = launch(tmp_path, 1, args)
    assert ok.returncode == 0
    counts = metrics(out, "data")[-1]
    assert counts["bad_image"] >= 1 and counts["no_caption"] >= 1 and counts["corrupt_tar"] >= 1
    for reason in ("bad_image", "no_caption", "corrupt_tar"):
        assert ok.stderr.count(f"skipping bad train data ({reason})") == 1

    strict = launch(tmp_path, 1, [*args, "--set", "data.max_bad_fraction=0.001"])
    assert strict.returncode == 1
    last = strict.stderr.strip().splitlines()[-1]
    assert last.startswith("error: bad train data: ") and "above data.max_bad_fraction=0.001" in last


def test_all_bad_data_stops_with_one_line(digits_root: Path, tmp_path: Path) -> None:
    src = sorted((digits_root / "train").glob("*.tar"))[:2]
    (tmp_path / "shards").mkdir()
    for url in src:
        with tarfile.open(url) as tar:
            captions = {n: b"" for n in tar.getnames() if n.endswith(".txt")}
        _rewrite_tar(url, tmp_path / "shards" / url.name, captions)
    pattern = str(tmp_path / "shards" / f"{{{src[0].stem}..{src[-1].stem}}}.tar")
    args = small_run(digits_root, tmp_path / "run", "--set", "eval.data=null", "--set", f"data.train={pattern}")
    proc = launch(tmp_path, 1, args)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: bad train data: no valid sample in ") and src[0].name in last


def test_resume_errors_are_one_line_before_any_process_group(digits_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = launch(tmp_path, 1, [*small_run(digits_root, out), "--resume", "latest"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"config error: --resume latest: no checkpoint in {out / 'checkpoints'} (no 'latest' file)"
    )
    (out / "checkpoints" / "step00000002").mkdir(parents=True)
    proc = launch(tmp_path, 1, [*small_run(digits_root, out), "--resume", "step00000002"])
    assert proc.returncode == 2 and "does not exist" in proc.stderr.strip().splitlines()[-1]


def test_pruning_counts_complete_tags_only_and_cleaning_removes_incomplete_ones(tmp_path: Path) -> None:
    from fastclip_ds import checkpoint

    tags = [checkpoint.tag_for(s) for s in (2, 4, 6, 8)]
    for tag in tags:
        (tmp_path / tag).mkdir()
        (tmp_path / "universal" / tag).mkdir(parents=True)
        if tag != tags[-1]:  # step 8: a save cut off before complete.json
            (tmp_path / tag / checkpoint.COMPLETE).write_text('{"step": 0, "world_size": 1, "zero_stage": 2}\n')
    checkpoint._prune(tmp_path, keep=2, current=tags[2])
    assert sorted(p.name for p in tmp_path.glob("step*")) == tags[1:]
    assert sorted(p.name for p in (tmp_path / "universal").iterdir()) == tags[1:]
    with pytest.raises(FileNotFoundError, match=r"step00000008 is incomplete \(no complete.json"):
        checkpoint.resolve(tmp_path, tags[-1])
    assert checkpoint.clean_incomplete(tmp_path) == [tags[-1]]
    assert sorted(p.name for p in tmp_path.glob("step*")) == tags[1:3]
    assert checkpoint.resolve(tmp_path, tags[1]) == tags[1]
