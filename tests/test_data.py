"""The webdataset train pipeline on real shards: coverage, world-size invariance, resume, rank split, bad data."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip_ds import data as data_module
from fastclip_ds.data import (
    NO_KEY,
    REASONS,
    BadDataError,
    CsvLayout,
    _read_tar,
    expand_urls,
    steps_per_epoch,
    train_loader,
)
from fastclip_ds.digits import NUM_TRAIN, train_pattern

TOKEN_LEN = 64


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def noisy(img: Image.Image) -> torch.Tensor:
    """A random augmentation: the output depends on the torch RNG."""
    return to_tensor(img) + torch.rand(())


def byte_tokens(captions: list[str]) -> torch.Tensor:
    return torch.tensor([list(c.encode().ljust(TOKEN_LEN, b"\0")) for c in captions], dtype=torch.long)


def untokenize(tokens: torch.Tensor) -> list[str]:
    return [bytes(row.tolist()).rstrip(b"\0").decode() for row in tokens]


def load(pattern: str, **kw) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    args = {
        "num_samples": NUM_TRAIN,
        "global_batch": 100,
        "world_size": 1,
        "rank": 0,
        "seed": 0,
        "epoch": 0,
        "image_transform": to_tensor,
        "tokenizer": byte_tokens,
        "num_workers": 0,
        "split": "global",
    }
    return list(train_loader(pattern, **(args | kw)))


def global_steps(pattern: str, world: int, **kw) -> list[tuple[torch.Tensor, ...]]:
    """Per step, the ranks' local batches concatenated in rank order."""
    per_rank = [load(pattern, world_size=world, rank=r, **kw) for r in range(world)]
    return [tuple(torch.cat(parts) for parts in zip(*steps, strict=True)) for steps in zip(*per_rank, strict=True)]


@pytest.fixture(scope="module")
def pattern(digits_root: Path) -> str:
    return train_pattern(digits_root)


@pytest.fixture(scope="module")
def reference(pattern: str) -> dict[int, tuple[str, torch.Tensor]]:
    """key -> (caption, image tensor), read straight from the tars."""
    out = {}
    for url in expand_urls(pattern):
        with tarfile.open(url) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in files.items():
            if name.endswith(".json"):
                stem, key = name[:-5], json.loads(data)["key"]
                out[key] = (files[f"{stem}.txt"].decode(), to_tensor(Image.open(io.BytesIO(files[f"{stem}.png"]))))
    return out


def assert_rows_match(batch: tuple[torch.Tensor, ...], reference: dict) -> None:
    images, tokens, keys = batch
    for img, caption, key in zip(images, untokenize(tokens), keys.tolist(), strict=True):
        assert caption == reference[key][0]
        assert torch.equal(img, reference[key][1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_sees_every_key_once(pattern: str, reference: dict, num_workers: int) -> None:
    steps = global_steps(pattern, 2, num_workers=num_workers)
    assert len(steps) == steps_per_epoch(NUM_TRAIN, 100) == 14
    images, tokens, keys = (torch.cat(parts) for parts in zip(*steps, strict=True))
    assert images.shape == (NUM_TRAIN, 3, 32, 32) and images.dtype == torch.float32
    assert tokens.shape == (NUM_TRAIN, TOKEN_LEN) and keys.dtype == torch.int64
    assert sorted(keys.tolist()) == list(range(NUM_TRAIN))
    assert keys.tolist() != sorted(keys.tolist())  # shuffled
    assert_rows_match((images, tokens, keys), reference)
    one_rank = global_steps(pattern, 1)  # workers only split steps: same stream as one rank in-process
    assert all(torch.equal(a[2], b[2]) for a, b in zip(steps, one_rank, strict=True))


def test_global_batches_are_world_size_invariant(pattern: str) -> None:
    # 1600 samples > 1400: the stream wraps into a reshuffled second pass mid-batch (1600 / 80 = 20 steps).
    kw = {"num_samples": 1600, "global_batch": 80, "image_transform": noisy, "shuffle_buffer": 300}
    ref = global_steps(pattern, 1, **kw)
    assert len(ref) == 20
    for world in (2, 4):
        got = global_steps(pattern, world, **kw)
        for a, b in zip(ref, got, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # keys, tokens and augmented images


def test_wraps_around_with_a_new_order(pattern: str) -> None:
    keys = [k for _, _, k in load(pattern, num_samples=2 * NUM_TRAIN)]
    first, second = torch.cat(keys[:14]).tolist(), torch.cat(keys[14:]).tolist()
    assert sorted(first) == sorted(second) == list(range(NUM_TRAIN))
    assert first != second


def test_order_depends_on_seed_and_epoch_only(pattern: str) -> None:
    def order(**kw) -> list[int]:
        return torch.cat([k for _, _, k in load(pattern, num_samples=400, **kw)]).tolist()

    base = order()
    assert order() == base
    assert order(epoch=1) != base
    assert order(seed=1) != base
    assert len(set(base)) == 400


@pytest.mark.parametrize(("split", "num_workers"), [("global", 0), ("global", 2), ("rank", 2)])
def test_start_step_resumes_at_that_batch(pattern: str, split: str, num_workers: int) -> None:
    kw = {"world_size": 2, "rank": 1, "split": split, "num_workers": num_workers, "image_transform": noisy}
    full = load(pattern, **kw)
    resumed = load(pattern, start_step=5, **kw)
    assert len(full) == 14 and len(resumed) == 9
    for a, b in zip(full[5:], resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert load(pattern, start_step=14, **kw) == []


def test_start_step_skips_without_decoding(pattern: str) -> None:
    decoded = []

    def counting(img: Image.Image) -> torch.Tensor:
        decoded.append(1)
        return to_tensor(img)

    assert len(load(pattern, start_step=10, world_size=2, rank=0, image_transform=counting)) == 4
    assert len(decoded) == 4 * 50  # only this rank's rows of the remaining steps


def test_rank_split_gives_disjoint_shards(pattern: str, reference: dict) -> None:
    per_rank = [load(pattern, world_size=2, rank=r, split="rank") for r in range(2)]
    keys = [torch.cat([k for _, _, k in batches]).tolist() for batches in per_rank]
    assert [len(batches) for batches in per_rank] == [14, 14] and [len(k) for k in keys] == [700, 700]
    shards = [{k // 100 for k in ks} for ks in keys]  # digits keys are numbered shard by shard
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(14))
    assert sorted(keys[0] + keys[1]) == list(range(NUM_TRAIN))
    assert_rows_match(per_rank[0][0], reference)
    firsts = [
        load(pattern, world_size=2, rank=r, split="rank", num_samples=200, image_transform=noisy)[0] for r in range(2)
    ]
    offsets = [float((images[0] - reference[int(keys[0])][1]).mean()) for images, _, keys in firsts]
    assert offsets[0] != offsets[1]  # ranks draw different augmentations
    with pytest.raises(ValueError, match="needs >= world_size\\*num_workers = 16 shards, got 14"):
        train_loader(pattern, **(_required() | {"world_size": 4, "split": "rank", "num_workers": 4}))


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _sample(key: int, *, png: bytes | None = None, txt: str | None = None, meta: object = None) -> list:
    stem = f"{key:06d}"
    out = [(f"{stem}.png", png if png is not None else _png(key))]
    out.append((f"{stem}.txt", (txt if txt is not None else f"caption {key}").encode()))
    out.append((f"{stem}.json", json.dumps(meta if meta is not None else {"key": key}).encode()))
    return out


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def bad_shards(tmp_path: Path) -> tuple[str, set[int]]:
    """Three shards with every kind of bad sample; returns (pattern, keys of the valid samples)."""
    good = [m for k in range(7) for m in _sample(k)]
    good[3 * 3 + 2] = ("000003.json", b'{"key": "000000003"}')  # img2dataset writes keys as strings
    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    bad = [m for k in (100, 101) for m in _sample(k)]
    bad += _sample(102, png=b"not an image at all")  # bad_image
    bad += _sample(103, txt="   ")  # no_caption
    bad += [m for m in _sample(104) if not m[0].endswith(".txt")]  # no_caption
    bad += [m for m in _sample(105) if not m[0].endswith(".json")]  # no_key
    bad += _sample(106, meta={"id": 106})  # no_key
    bad += _sample(110, meta={"key": 10**6})  # key_out_of_range
    bad += [m for m in _sample(107) if not m[0].endswith(".png")]  # no_image
    bad += _sample(108, png=buf.getvalue()[:-100])  # header parses, pixel data truncated: image_substituted
    bad += _sample(109)
    truncated = _tar_bytes([m for k in range(200, 206) for m in _sample(k)])
    with tarfile.open(fileobj=io.BytesIO(truncated)) as tar:
        cut = tar.getmember("000205.png").offset_data + 10  # corrupt_tar: 205 is lost mid-image
    (tmp_path / "s0.tar").write_bytes(_tar_bytes(good))
    (tmp_path / "s1.tar").write_bytes(_tar_bytes(bad))
    (tmp_path / "s2.tar").write_bytes(truncated[:cut])
    valid = set(range(7)) | {100, 101, 108, 109} | set(range(200, 205))
    return f"{tmp_path}/s{{0..2}}.tar", valid


@pytest.mark.parametrize("split", ["global", "streams"])
def test_bad_data_is_skipped_and_counted(
    bad_shards: tuple[str, set[int]], caplog: pytest.LogCaptureFixture, split: str
) -> None:
    pattern, valid = bad_shards
    expected = {"no_image": 1, "bad_image": 1, "no_caption": 2, "no_key": 2, "key_out_of_range": 1, "corrupt_tar": 1}
    kw = {"num_samples": 16, "global_batch": 8, "num_workers": 0, "key_limit": 1000, "split": split}
    # global: 2 ranks, each reads (and counts) everything; streams: one stream reads the three shards in one pass
    ranks = 2 if split == "global" else 1
    kw |= {"world_size": ranks, "streams": 1}
    loaders = [train_loader(pattern, **(_required() | kw | {"rank": r})) for r in range(ranks)]
    with caplog.at_level(logging.WARNING, logger="fastclip_ds.data"):
        per_rank = [list(loader) for loader in loaders]
    keys = sorted(k for batches in per_rank for _, _, ks in batches for k in ks.tolist())
    assert keys == sorted(valid)
    stats = [loader.stats() for loader in loaders]
    assert set(expected) | {"image_substituted"} == set(REASONS)  # every reason is exercised
    for s in stats:
        assert s == expected | {"image_substituted": s["image_substituted"]}
    assert sum(s["image_substituted"] for s in stats) == 1
    (img_108,) = [
        img for batches in per_rank for ims, _, ks in batches for img, k in zip(ims, ks, strict=True) if k == 108
    ]
    assert torch.count_nonzero(img_108) == 0 and img_108.shape == (3, 8, 8)  # black stand-in, same size
    warned = [r.getMessage() for r in caplog.records]
    assert sum("(no_caption)" in m for m in warned) == ranks  # once per reason and loader


def test_keys_are_needed_only_by_losses_with_per_sample_state(tmp_path: Path) -> None:
    # Catches: keyless shards refused for the openclip loss, or skipped sample by sample (an empty epoch) instead
    # of a clear stop for a loss whose per-sample state needs keys.
    for shard in range(2):
        members = [m for k in range(4 * shard, 4 * shard + 4) for m in _sample(k) if not m[0].endswith(".json")]
        (tmp_path / f"k{shard}.tar").write_bytes(_tar_bytes(members))
    pattern = f"{tmp_path}/k{{0..1}}.tar"
    kw = _required() | {"num_samples": 8, "global_batch": 4, "split": "streams", "streams": 2}
    batches = list(train_loader(pattern, **kw))
    captions = sorted(c for _, tokens, _ in batches for c in untokenize(tokens))
    assert captions == sorted(f"caption {k}" for k in range(8))
    assert all(k == NO_KEY for _, _, keys in batches for k in keys.tolist())
    with pytest.raises(BadDataError, match=rf"^{tmp_path}/k[01]\.tar: no sample has an integer json 'key'"):
        list(train_loader(pattern, **(kw | {"key_limit": 100})))


def test_csv_rows_are_samples_keyed_by_row_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Catches: keys that are not row numbers, rows lost or repeated across row-range shards, the caption and image
    # columns mixed up, and a missing image file that crashes instead of being skipped as no_image.
    monkeypatch.chdir(tmp_path)  # image paths as given, from the working directory (as OpenCLIP reads them)
    monkeypatch.setattr(data_module, "CSV_CHUNK", 8)  # 31 rows: four row-range shards
    (tmp_path / "img").mkdir()
    lines = ["title,img"]
    for row in range(31):
        if row != 17:
            (tmp_path / "img" / f"{row}.png").write_bytes(_png(row))
        lines.append(f"caption {row},img/{row}.png")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    kw = {"num_samples": 30, "global_batch": 10, "split": "streams", "streams": 1, "key_limit": 31}
    loader = train_loader("train.csv", **(_required() | kw), csv_layout=CsvLayout("img", "title", ","))
    batches = list(loader)
    rows = [(k, c, img) for ims, t, ks in batches for k, c, img in zip(ks.tolist(), untokenize(t), ims, strict=True)]
    assert sorted(k for k, _, _ in rows) == [r for r in range(31) if r != 17]
    assert all(c == f"caption {k}" and torch.all(img == k / 255) for k, c, img in rows)
    assert loader.stats()["no_image"] == 1
    with pytest.raises(ValueError, match=r"train\.csv: no column 'filepath'"):
        train_loader("train.csv", **(_required() | kw))  # OpenCLIP's default columns: filepath, title, tab


def test_wait_for_each_batch_is_measured(pattern: str) -> None:
    # Catches: wait time not accumulated per batch, or not reset when taken (the logged mean would drift).
    def slow(img: Image.Image) -> torch.Tensor:
        time.sleep(0.01)
        return to_tensor(img)

    loader = train_loader(pattern, **(_required() | {"global_batch": 8, "num_samples": 16, "image_transform": slow}))
    assert loader.take_wait_ms() == 0.0  # nothing asked yet
    assert len(list(loader)) == 2
    assert loader.take_wait_ms() >= 8 * 10 * 2 / 3  # 3 waits (2 batches + the end), each batch 8 sleeps of 10 ms
    assert loader.take_wait_ms() == 0.0


def _required() -> dict:
    return {
        "num_samples": 400,
        "global_batch": 100,
        "world_size": 1,
        "rank": 0,
        "seed": 0,
        "epoch": 0,
        "image_transform": to_tensor,
        "tokenizer": byte_tokens,
        "split": "global",
    }


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"split": "nodes"}, ValueError, "split must be one of"),
        ({"global_batch": 100, "world_size": 3}, ValueError, "multiple of world_size"),
        ({"rank": 2, "world_size": 2}, ValueError, "0 <= rank < world_size"),
        ({"num_samples": 99}, ValueError, "smaller than one global batch"),
        ({"start_step": 5}, ValueError, "start_step"),
        ({"num_workers": -1}, ValueError, "num_workers"),
    ],
)
def test_bad_arguments_fail_clearly(pattern: str, change: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        train_loader(pattern, **(_required() | change))


def test_missing_shard_and_empty_pattern(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="1 train shard"):
        train_loader(str(tmp_path / "missing.tar"), **_required())
    with pytest.raises(ValueError, match="expands to no shards"):
        train_loader("", **_required())


def test_expand_pattern_braces_joins_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    urls = expand_urls("~/a/{00..02}.tar::/b/x-{1..2}.tar")
    assert urls == [f"{tmp_path}/a/00.tar", f"{tmp_path}/a/01.tar", f"{tmp_path}/a/02.tar", "/b/x-1.tar", "/b/x-2.tar"]


def test_real_open_clip_tokenizer_and_transform(pattern: str, reference: dict) -> None:
    from fastclip_ds.compat import import_open_clip

    open_clip = import_open_clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    transform = open_clip.image_transform(32, is_train=True)
    kw = {"num_samples": 128, "global_batch": 64, "world_size": 2, "rank": 1, "image_transform": transform}
    rng_before = torch.get_rng_state()
    batches = load(pattern, tokenizer=tokenizer, **kw)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    images, tokens, keys = batches[0]
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert tokens.shape == (32, 77) and tokens.dtype == torch.long
    assert torch.equal(tokens, tokenizer([reference[k][0] for k in keys.tolist()]))
    again = load(pattern, tokenizer=tokenizer, **kw)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))  # reproducible augmentation


def _reasons(path: Path) -> list:
    return [x if isinstance(x, str) else json.loads(x["json"])["key"] for x in _read_tar(str(path))]


@pytest.mark.parametrize(
    ("cut", "kept"),
    [
        (None, [0, 1, 2]),  # whole archive
        ("boundary", [0, 1]),  # ends after sample 2's last member: no end-of-archive block
        ("in_header", [0, 1]),  # ends 100 bytes into the header after sample 2
        ("bad_header", [0]),  # garbage where sample 2's first header is
    ],
)
def test_tar_ending_without_end_block_is_corrupt(tmp_path: Path, cut: str | None, kept: list) -> None:
    data = _tar_bytes([m for k in range(3) for m in _sample(k)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmember("000002.json")
        end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        start2 = tar.getmember("000002.png").offset
    data = {
        None: data,
        "boundary": data[:end],
        "in_header": data[: end + 100],
        "bad_header": data[:start2] + b"\x07" * tarfile.BLOCKSIZE + data[start2 + tarfile.BLOCKSIZE :],
    }[cut]
    (tmp_path / "s.tar").write_bytes(data)
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(data))
    expected = kept + ([] if cut is None else ["corrupt_tar"])
    assert _reasons(tmp_path / "s.tar") == expected
    assert _reasons(tmp_path / "s.tar.gz") == expected
