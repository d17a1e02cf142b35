"""``fastclip-ds data digits OUT_DIR``: a real image-text dataset from scikit-learn's bundled digits.

Layout written under ``OUT_DIR`` (nothing is downloaded; same seed, same bytes)::

    train/000000.tar ... 000013.tar   img2dataset layout: KEY.png, KEY.txt (caption), KEY.json {key, label, caption}
    train/sizes.json                  {shard file name: sample count} (OpenCLIP reads it for the epoch size)
    eval/classnames.txt               CLIP_benchmark wds layout (``--dataset wds/digits --dataset_root OUT_DIR/eval``)
    eval/zeroshot_classification_templates.txt   held-out templates, never used in training captions
    eval/dataset_type.txt             "classification"
    eval/test/nshards.txt, eval/test/0.tar ...   KEY.png, KEY.cls (integer label as text)
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import random
import shutil
import sys
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

NUM_TRAIN = 1400
NUM_TEST = 397
DEFAULT_SIZE = 32
DEFAULT_SEED = 0
DEFAULT_SHARD_SIZE = 100

CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASSNAMES = tuple(str(i) for i in range(10))  # eval class names (CLIP_benchmark's MNIST convention)
TRAIN_TEMPLATES = (
    "a photo of the number {c}.",
    "a handwritten digit {c}.",
    "the digit {c}",
    "an image of a {c}.",
    "a black and white picture of the number {c}.",
)
EVAL_TEMPLATES = (
    'a photo of the number: "{c}".',
    "a drawing of the number {c}.",
    "a low resolution image of the digit {c}.",
)


def default_root() -> Path:
    """``$FASTCLIP_DATA`` if set, else ``~/.cache/fastclip_ds/digits``."""
    return Path(os.environ.get("FASTCLIP_DATA", "~/.cache/fastclip_ds/digits")).expanduser()


DEFAULT_ROOT = default_root()


def train_pattern(root: str | Path, shard_size: int = DEFAULT_SHARD_SIZE) -> str:
    """Brace pattern of the train shards, e.g. ``ROOT/train/{000000..000013}.tar``."""
    last = -(-NUM_TRAIN // shard_size) - 1
    return f"{Path(root).expanduser()}/train/{{{0:06d}..{last:06d}}}.tar"


def eval_root(root: str | Path) -> Path:
    """The CLIP_benchmark-style eval dataset root (holds ``classnames.txt`` and ``test/``)."""
    return Path(root).expanduser() / "eval"


def _image_png(pixels: np.ndarray, size: int) -> bytes:
    """8x8 array with values 0-16 -> RGB PNG of ``size``x``size``, white digit on black."""
    gray = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8))
    buf = io.BytesIO()
    gray.resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> None:
    """Write a tar with fixed metadata (mtime 0, uid 0) so the bytes depend only on the content."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))


def _split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split into NUM_TRAIN / NUM_TEST indices (each in shuffled order)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=seed)


def _write_tree(out: Path, size: int, seed: int, shard_size: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train_idx, test_idx = _split(digits.target, seed)
    rng = random.Random(seed)
    (out / "train").mkdir(parents=True)
    sizes = {}
    for shard, start in enumerate(range(0, NUM_TRAIN, shard_size)):
        members = []
        for key in range(start, min(start + shard_size, NUM_TRAIN)):
            label = int(digits.target[train_idx[key]])
            name = rng.choice((CLASS_WORDS[label], CLASSNAMES[label]))
            caption = rng.choice(TRAIN_TEMPLATES).format(c=name)
            meta = {"key": key, "label": label, "caption": caption}
            stem = f"{key:06d}"
            members += [
                (f"{stem}.png", _image_png(digits.images[train_idx[key]], size)),
                (f"{stem}.txt", caption.encode()),
                (f"{stem}.json", json.dumps(meta).encode()),
            ]
        _write_tar(out / "train" / f"{shard:06d}.tar", members)
        sizes[f"{shard:06d}.tar"] = len(members) // 3
    (out / "train" / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")

    ev = out / "eval"
    (ev / "test").mkdir(parents=True)
    (ev / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (ev / "zeroshot_classification_templates.txt").write_text("\n".join(EVAL_TEMPLATES) + "\n")
    (ev / "dataset_type.txt").write_text("classification\n")
    starts = range(0, NUM_TEST, shard_size)
    for shard, start in enumerate(starts):
        members = []
        for i in range(start, min(start + shard_size, NUM_TEST)):
            members += [
                (f"{i:06d}.png", _image_png(digits.images[test_idx[i]], size)),
                (f"{i:06d}.cls", str(int(digits.target[test_idx[i]])).encode()),
            ]
        _write_tar(ev / "test" / f"{shard}.tar", members)
    (ev / "test" / "nshards.txt").write_text(f"{len(starts)}\n")


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``OUT.lock`` (beside ``out``) for the duration."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomic(out: Path, size: int, seed: int, shard_size: int) -> None:
    """Write into a sibling temp dir, then rename; the caller holds the lock, so any older temp dir is stale."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        _write_tree(tmp, size, seed, shard_size)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_digits(
    out: str | Path, *, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED, shard_size: int = DEFAULT_SHARD_SIZE
) -> Path:
    """Write the dataset to ``out`` (which must not exist) atomically; returns the resolved path."""
    if size < 8:
        raise ValueError(f"--size must be >= 8 (the digits are 8x8), got {size}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out).expanduser().absolute()
    with _locked(out):
        if out.exists():
            raise FileExistsError(f"{out} already exists; remove it or choose another OUT_DIR")
        _write_atomic(out, size, seed, shard_size)
    return out


def ensure_digits(root: str | Path | None = None) -> Path:
    """Return ``root`` (default :func:`default_root`), writing the default dataset there first if missing.

    Safe when several processes call it at once: one writes under a file lock, the others wait and reuse it.
    """
    out = (default_root() if root is None else Path(root).expanduser()).absolute()
    if out.exists():
        return out
    with _locked(out):
        if not out.exists():
            _write_atomic(out, DEFAULT_SIZE, DEFAULT_SEED, DEFAULT_SHARD_SIZE)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastclip-ds data digits",
        description="Write scikit-learn's 1,797 bundled 8x8 digits as a CLIP image-text dataset: "
        f"{NUM_TRAIN} train samples as webdataset shards (img2dataset layout, templated captions) and "
        f"{NUM_TEST} test samples in CLIP_benchmark's wds layout with held-out zero-shot templates.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory; must not exist yet")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels, bicubic upscale (default {DEFAULT_SIZE})"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of the stratified train/test split and of the captions (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help=f"samples per tar shard, train and test (default {DEFAULT_SHARD_SIZE})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``digits OUT_DIR [--size N] [--seed S] [--shard-size N]``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        out = write_digits(args.out_dir, size=args.size, seed=args.seed, shard_size=args.shard_size)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {NUM_TRAIN} train samples to {train_pattern(out, args.shard_size)}")
    print(f"wrote {NUM_TEST} test samples to {eval_root(out)} (CLIP_benchmark wds layout)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
