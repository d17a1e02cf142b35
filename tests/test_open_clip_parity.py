"""Our trainer's update equals open_clip_train's (``launchers/update_parity.py``): same weights, same batches,
2 gloo ranks, real DeepSpeed engine against open_clip_train's own ``train_one_epoch`` under DDP."""

import json
import sys
from pathlib import Path

import torch

from fastclip_ds import digits
from fastclip_ds.multiproc import free_port

from .test_train import REPO, run

sys.path.insert(0, str(REPO / "launchers"))
import update_parity


def test_parity_measures_the_gap_relative_to_the_update():
    init = {"a": torch.zeros(3), "b": torch.ones(2)}
    theirs = {"a": torch.tensor([0.0, 2.0, -4.0]), "b": torch.ones(2)}
    ours = {"a": torch.tensor([0.0, 2.0, -3.0]), "b": torch.full((2,), 1.5)}
    report = update_parity.parity(ours, theirs, init)
    assert report["per_tensor"]["a"] == {"max_update": 4.0, "max_gap": 1.0, "gap_over_update": 0.25}
    assert report["per_tensor"]["b"]["gap_over_update"] is None  # did not move in theirs: no ratio
    assert (report["worst_gap_over_update"], report["tensors"], report["moved"]) == (0.25, 2, 1)


def test_five_steps_match_open_clip_train(digits_root: Path, tmp_path: Path):
    out = tmp_path / "parity.json"
    sets = {
        "data.train": digits.train_pattern(digits_root),
        "eval.data": str(digits.eval_root(digits_root)),
        "model.config": "fastclip-micro",
        "train.global_batch_size": 32,
        "train.warmup_steps": 2,  # steps 0-4 cross the warm-up into the cosine
        "train.lr": 1e-3,
        "optimizer.weight_decay": 0.2,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "launchers" / "update_parity.py"), "--steps", "5", "--out", str(out),
           *(x for k, v in sets.items() for x in ("--set", f"{k}={v}"))]  # fmt: skip
    assert run(cmd).returncode == 0
    report = json.loads(out.read_text())
    assert report["moved"] == report["tensors"] > 30  # every tensor trained, logit_scale included
    assert report["per_tensor"]["logit_scale"]["max_update"] > 1e-4
    assert report["worst_gap_over_update"] < 1e-3, report["worst_gap_over_update"]
