"""A real training run on two sources weighted 3:1 (resampled, persistent loader workers across three epochs):
FastCLIP's per-sample state is touched only in each source's own key range, whole shards at a time, about 3:1."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .test_reliability import loss_table
from .test_streams import write_shards
from .test_train import run

SHARDS, PER_SHARD = 480, 4  # per source; one shard per stream and step (32 rows / 8 streams), drawn with replacement


def test_weighted_sources_train_into_their_own_key_ranges(tmp_path: Path) -> None:
    # Catches: the second source's keys landing in the first one's range (both hold keys 0..1919 on disk), an offset
    # off by some rows (touched rows would straddle shards), and upsampling factors lost on the way to the trainer's
    # loader (1:1 instead of 3:1). 48 draws, 36:12 (smooth round robin); a shard drawn twice counts once (seed 0:
    # 35:10), hence the loose upper bound.
    a = write_shards(tmp_path / "a", shards=SHARDS, per_shard=PER_SHARD, name="a")
    b = write_shards(tmp_path / "b", shards=SHARDS, per_shard=PER_SHARD, name="b")
    n = SHARDS * PER_SHARD
    out = tmp_path / "run"
    sets = {
        "data.train": f"{a}::{b}",
        "data.source_sizes": f"[{n}, {n}]",
        "data.upsampling_factors": "[3, 1]",
        "data.resampled": "true",
        "data.streams": "8",
        "data.num_samples": "64",  # 2 steps per epoch: 6 steps are 3 epochs
        "data.num_workers": "1",
        "loss.name": "fastclip_v3",
        "model.config": "fastclip-micro",
        "train.global_batch_size": "32",
        "train.max_steps": "6",
        "train.epochs": "3",
        "train.warmup_steps": "1",
        "eval.data": "null",
        "train.output_dir": str(out),
    }
    args = [x for key, value in sets.items() for x in ("--set", f"{key}={value}")]
    proc = run([sys.executable, "-m", "fastclip_ds.train", *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    u = loss_table(out / "checkpoints" / "step00000006")
    assert u.shape[0] == 2 * n  # data.dataset_size derived from the source sizes
    touched = torch.isfinite(u).all(1).reshape(2, SHARDS, PER_SHARD)  # [source, shard, sample]
    assert torch.equal(touched.all(2), touched.any(2))  # whole shards: each source's keys map one to one
    shards_a, shards_b = touched.all(2).sum(1).tolist()
    assert shards_b > 0 and 2.4 <= shards_a / shards_b <= 4.2, (shards_a, shards_b)
    assert shards_a + shards_b <= 6 * 8  # at most one shard per stream and step
