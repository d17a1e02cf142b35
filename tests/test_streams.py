"""The default ``streams`` split: the same global batches at any world size in the family, each shard byte read
once per epoch across the whole job (counted with strace), and a resume that reads one shard per stream."""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip_ds.config import ConfigError, dataset_size, load_config, validate
from fastclip_ds.data import TrainLoader, expand_urls, train_loader
from fastclip_ds.data_bench import shard_bytes_read
from fastclip_ds.digits import train_pattern
from fastclip_ds.streams import stream_layout

from .test_data import _required, noisy, untokenize

REPO = Path(__file__).parents[1]
SHARDS, PER_SHARD = 16, 50  # 8 streams x 2 shards: every sample once per epoch


def write_shards(root: Path, shards: int = SHARDS, per_shard: int = PER_SHARD, name: str = "sample") -> str:
    """Shards of 16x16 noise PNGs with captions ``"{name} {key}"`` and integer keys ``0 .. shards * per_shard - 1``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = s * per_shard + i
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
                for ext, payload in (("png", buf.getvalue()), ("txt", f"{name} {key}".encode())):
                    info = tarfile.TarInfo(f"{key:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                meta = json.dumps({"key": key}).encode()
                info = tarfile.TarInfo(f"{key:06d}.json")
                info.size = len(meta)
                tar.addfile(info, io.BytesIO(meta))
    return f"{root}/{{000..{shards - 1:03d}}}.tar"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(tmp_path_factory.mktemp("streams") / "shards")


def loader(pattern: str, **kw) -> TrainLoader:
    args = {"num_samples": SHARDS * PER_SHARD, "global_batch": 32, "num_workers": 0, "split": "streams", "streams": 8}
    return train_loader(pattern, **(_required() | args | kw))


def global_steps(pattern: str, world: int, **kw) -> list[tuple[torch.Tensor, ...]]:
    """Per step, the ranks' local batches concatenated in rank order."""
    per_rank = [list(loader(pattern, world_size=world, rank=r, **kw)) for r in range(world)]
    return [tuple(torch.cat(parts) for parts in zip(*steps, strict=True)) for steps in zip(*per_rank, strict=True)]


def assert_same_steps(a: list[tuple[torch.Tensor, ...]], b: list[tuple[torch.Tensor, ...]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))  # the same rows, replayed


def test_global_batches_are_the_same_for_world_sizes_and_workers(digits_root: Path) -> None:
    # Catches: rows that depend on the rank/worker split, and augmentation seeded per rank instead of per global row.
    # 14 digits shards over 8 streams: short streams wrap into their next pass inside the run (2000 > 1400 samples).
    pattern = train_pattern(digits_root)
    kw = {"num_samples": 2048, "global_batch": 64, "image_transform": noisy, "shuffle_buffer": 30}
    ref = global_steps(pattern, 1, **kw)
    assert len(ref) == 32 and len(set(ref[0][2].tolist())) == 64
    for world, workers in ((1, 2), (2, 2), (4, 2), (8, 0)):
        assert_same_steps(ref, global_steps(pattern, world, num_workers=workers, **kw))
    keys = torch.cat([step[2] for step in ref]).tolist()
    assert keys != sorted(keys) and set(keys) == set(range(1400))


def test_epoch_sees_every_sample_once_when_shards_divide(shards: str) -> None:
    # Catches: a stream reading another stream's shard, or a shard dealt twice / never within a pass.
    keys = torch.cat([k for _, _, k in loader(shards)]).tolist()
    assert sorted(keys) == list(range(SHARDS * PER_SHARD))
    again = torch.cat([k for _, _, k in loader(shards, epoch=1)]).tolist()
    assert sorted(again) == sorted(keys) and again != keys  # a new order each epoch


def expected_keys(root: Path, epoch: int, streams: int = 8, global_batch: int = 32) -> list[list[int]]:
    """Per step, the keys of the global batch as the streams split documents them, derived here for blocks of one
    sample (no shuffle within a shard): stream s reads the shards at positions s, s + S, ... of the shard order
    shuffled by (seed 0, epoch, pass 0), each in file order; step t takes the next G / S samples of every stream."""
    urls = [f"{root}/{s:03d}.tar" for s in range(SHARDS)]
    random.Random(f"0:{epoch}:0:shards").shuffle(urls)
    order = [[int(Path(u).stem) * PER_SHARD + i for u in urls[s::streams] for i in range(PER_SHARD)] for s in range(8)]
    n = global_batch // streams
    return [[k for keys in order for k in keys[t * n : (t + 1) * n]] for t in range(SHARDS * PER_SHARD // global_batch)]


def test_workers_persist_across_epochs_and_serve_each_epochs_batches(shards: str) -> None:
    # Catches: DataLoader workers made anew every epoch (new PIDs), persistent workers that keep the first epoch's
    # plan (epoch 1 = epoch 0 again) or go on where their streams stood, and skip/valid counts summed over epochs.
    def worker_pid(img: Image.Image) -> torch.Tensor:
        return torch.full((1,), float(os.getpid()))

    ld = loader(shards, num_workers=2, image_transform=worker_pid, shuffle_buffer=1)
    seen = []
    for epoch in (0, 1):
        ld.set_epoch(epoch)
        batches = list(ld)
        assert int(ld.dataset.valid.sum()) == SHARDS * PER_SHARD  # this epoch's samples only
        seen.append(({int(p) for images, _, _ in batches for p in images.flatten().tolist()}, batches))
    ld.close()
    (pids, first), (pids_again, second) = seen
    assert len(pids) == 2 and os.getpid() not in pids and pids_again == pids
    for epoch, batches in enumerate((first, second)):
        assert [keys.tolist() for _, _, keys in batches] == expected_keys(Path(shards).parent, epoch)


def read_epoch(pattern: str, world: int, split: str, start_step: int = 0, resume: dict | None = None) -> None:
    """Run every rank's loader (2 DataLoader workers each) in this process: to the epoch's end, or for one batch
    when resuming. Executed under strace by the tests below."""
    for rank in range(world):
        kw = {"world_size": world, "rank": rank, "num_workers": 2, "split": split}
        batches = iter(loader(pattern, start_step=start_step, resume=resume, **kw))
        if start_step:
            next(batches)
        else:
            assert sum(1 for _ in batches) == SHARDS * PER_SHARD // 32


def bytes_read(pattern: str, **kw) -> int:
    code = "import json, sys; from tests.test_streams import read_epoch; read_epoch(**json.loads(sys.argv[1]))"
    cmd = [sys.executable, "-c", code, json.dumps({"pattern": pattern, **kw})]
    return shard_bytes_read(cmd, Path(pattern).parent, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_shard_is_read_once_per_epoch_across_ranks_and_workers(shards: str, world: int) -> None:
    # Catches: ranks or workers reading shards they do not own (the "global" split reads all of them everywhere).
    total = sum(Path(u).stat().st_size for u in expand_urls(shards))
    amplification = bytes_read(shards, world=world, split="streams") / total
    assert 1.0 <= amplification <= 1.05, amplification
    if world == 1:  # the counter sees redundant reads: the global split's 2 workers both read everything
        assert bytes_read(shards, world=world, split="global") / total > 1.9


def merged_state(loaders: list) -> dict:
    """What the trainer saves: each rank's stream positions, element-wise max over ranks."""
    flats: list[list[int]] = []
    for ld in loaders:  # each rank's contribution to the all-reduce
        ld.state(lambda flat: flats.append(flat) or flat)
    merged = torch.tensor(flats).amax(0).tolist()
    return loaders[0].state(lambda flat: merged)


def test_resume_from_saved_positions_is_exact_and_elastic(shards: str) -> None:
    # Catches: a position off by one sample or block, a block reshuffled differently on resume, positions of the
    # wrong rank's streams, and a replay fallback that differs from the position path.
    kw = {"image_transform": noisy, "shuffle_buffer": 20}
    full = global_steps(shards, 1, **kw)
    loaders = [loader(shards, world_size=2, rank=r, num_workers=2, **kw) for r in range(2)]
    iters = [iter(ld) for ld in loaders]
    for _ in range(13):  # stop after step 12: every stream is 52 samples in, inside its second shard's first block
        for it in iters:
            next(it)
    state = merged_state(loaders)
    assert state["step"] == 13 and all(p[:2] == [0, 1] for p in state["streams"])
    for world in (1, 4):
        resumed = global_steps(shards, world, start_step=13, resume=state, **kw)
        assert_same_steps(full[13:], resumed)
    replayed = global_steps(shards, 2, start_step=13, **kw)  # no saved position: replay without decoding
    assert_same_steps(full[13:], replayed)
    assert loader(shards, start_step=13, resume=state, **kw).state(lambda flat: flat) == state  # a save before
    assert loader(shards, start_step=13, **kw).state(lambda flat: flat) is None  # its first batch keeps the state
    stale = state | {"step": 12}  # a state of another step is ignored (replay), never misapplied
    assert_same_steps(full[13:], global_steps(shards, 1, start_step=13, resume=stale, **kw))


@pytest.mark.slow
def test_resume_reads_at_most_one_shard_per_stream_before_its_first_batch(shards: str) -> None:
    # Catches: a resume that re-reads the shards a stream finished before the checkpoint.
    ld = loader(shards, shuffle_buffer=1000)
    batches = iter(ld)
    for _ in range(20):  # every stream 80 samples in: its second shard, offset 30
        next(batches)
    state = ld.state(lambda flat: flat)
    shard = max(Path(u).stat().st_size for u in expand_urls(shards))
    by_position = bytes_read(shards, world=2, split="streams", start_step=20, resume=state)  # elastic: 1 -> 2 ranks
    assert by_position <= 8 * shard
    replayed = bytes_read(shards, world=2, split="streams", start_step=20)
    assert replayed > 8 * shard + 8 * shard // 2  # replay re-reads every stream's first shard


def test_stream_layout_family() -> None:
    # Catches: a worker count that would split a stream, or a world size outside the family accepted.
    assert stream_layout(8, 100, 2, 3, 64) == (8, 2)  # 4 streams per rank: 3 workers -> 2
    assert stream_layout(8, 100, 1, 16, 64) == (8, 8)
    assert stream_layout(8, 3, 1, 2, 64) == (2, 2)  # fewer shards than streams: the largest divisor that fits
    with pytest.raises(ValueError, match="world size 3 does not divide the 8 data streams"):
        stream_layout(8, 100, 3, 1, 96)
    with pytest.raises(ValueError, match="world size 4 does not divide the 2 data streams \\(only 3 shards\\)"):
        stream_layout(8, 3, 4, 1, 64)
    with pytest.raises(ValueError, match="global batch \\(60\\) must be a multiple of the 8 data streams"):
        stream_layout(8, 100, 2, 1, 60)


def test_world_size_outside_the_family_is_a_config_error(digits_root: Path) -> None:
    cfg = load_config(overrides=[f"data.train={train_pattern(digits_root)}", "train.global_batch_size=48"])
    validate(cfg, 2)
    with pytest.raises(ConfigError, match=r"data\.streams: world size 3 does not divide the 8 data streams \(only 14"):
        validate(cfg, 3)


def test_source_config_derives_the_dataset_size_and_checks_factors(digits_root: Path) -> None:
    two = f"data.train={train_pattern(digits_root)}::{train_pattern(digits_root)}"
    cfg = load_config(overrides=[two, "data.source_sizes=[1400, 600]", "data.resampled=true"])
    validate(cfg, 1)
    assert dataset_size(cfg) == 2000
    for extra, match in (
        (["data.upsampling_factors=[3, 1]", "data.resampled=false"], "needs data.resampled=true"),
        (["data.upsampling_factors=[3]"], "needs 2 positive number"),
        (["data.dataset_size=100"], "100 is not the sum of data.source_sizes"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate(load_config(overrides=[two, "data.source_sizes=[1400, 600]", "data.resampled=true", *extra]), 1)


def test_two_sources_weighted_3_to_1_mix_3_to_1_with_disjoint_keys(tmp_path: Path) -> None:
    # Catches: a factor ignored or applied per source instead of per shard (b has twice a's shards), a stream
    # phase that makes whole batches single-source, and two sources' key 0 sharing one slot of per-sample state.
    a = write_shards(tmp_path / "a", shards=4, per_shard=25, name="a")  # keys 0..99 on disk
    b = write_shards(tmp_path / "b", shards=8, per_shard=25, name="b")  # keys 0..199 on disk
    kw = {"resampled": True, "upsampling_factors": [6.0, 1.0], "source_sizes": [100, 200], "key_limit": 300}
    steps = list(loader(f"{a}::{b}", num_samples=3200, **kw))  # 8 streams x 16 draws of one 25-sample shard
    rows = [(c.split(), k) for _, tokens, keys in steps for c, k in zip(untokenize(tokens), keys.tolist(), strict=True)]
    from_a = sum(name == "a" for (name, _), _ in rows)
    assert abs(from_a / (len(rows) - from_a) - 3) <= 0.06  # 6 x 4 shards : 1 x 8 shards
    assert all(k == int(n) + (0 if name == "a" else 100) for (name, n), k in rows)  # a: [0, 100), b: [100, 300)
    assert all(2 <= sum(c.startswith("a") for c in untokenize(t)) <= 30 for _, t, _ in steps)  # batches mix
    assert len({k for _, k in rows if k < 100}) > 50  # shards are drawn, not only the first


def test_sources_need_matching_sizes_and_resampling_for_factors(shards: str) -> None:
    with pytest.raises(ValueError, match="1 source sizes for 2 '::'-separated train sources"):
        loader(f"{shards}::{shards}", source_sizes=[10])
    with pytest.raises(ValueError, match="upsampling factors need resampled=True"):
        loader(shards, upsampling_factors=[2.0])
