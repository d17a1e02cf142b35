"""Loader measurements: bytes read from shard files at the system-call level (every library's reads, every
process of a command), and the ``fastclip-ds bench-data`` comparison with OpenCLIP's webdataset pipeline."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

READ_CALLS = "read,pread64,readv,preadv,preadv2"
_READ = re.compile(r"^\w+\(\d+<(?P<path>[^>]*)>.*\)\s+=\s+(?P<n>\d+)$")


def shard_bytes_read(cmd: list[str], shard_dir: str | os.PathLike, cwd: str | os.PathLike | None = None) -> int:
    """Bytes that ``cmd`` and every process it forks read from files under ``shard_dir`` (``strace -ff -y``, one
    trace file per process so no call is split over lines). Raises ``RuntimeError`` if ``cmd`` fails."""
    if shutil.which("strace") is None:
        raise RuntimeError("strace is not installed (apt-get install strace)")
    root = os.path.realpath(shard_dir) + os.sep
    with tempfile.TemporaryDirectory() as tmp:
        trace = ["strace", "-ff", "-qq", "-y", "-e", f"trace={READ_CALLS}", "-o", f"{tmp}/t", *cmd]
        proc = subprocess.run(trace, cwd=cwd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        total = 0
        for path in Path(tmp).iterdir():
            for line in path.read_text(errors="replace").splitlines():
                m = _READ.match(line)
                if m and m["path"].startswith(root):
                    total += int(m["n"])
    return total


def write_jpeg_shards(out: Path, samples: int, per_shard: int, seed: int = 0) -> str:
    """``samples`` photo-like JPEGs of 224..256 px (smooth colour fields with grain, quality 90) with captions and
    integer keys, ``per_shard`` to a tar; returns the brace pattern."""
    import io
    import json
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = [
        "a",
        "photo",
        "of",
        "the",
        "red",
        "blue",
        "small",
        "large",
        "dog",
        "cat",
        "tree",
        "house",
        "car",
        "street",
        "sky",
        "on",
        "in",
        "with",
    ]
    out.mkdir(parents=True, exist_ok=True)
    shards = -(-samples // per_shard)
    for shard in range(shards):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for key in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                w, h = rng.integers(224, 257, size=2)
                field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
                pixels = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
                buf = io.BytesIO()
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
                caption = " ".join(rng.choice(words, size=rng.integers(5, 12)))
                for ext, payload in (
                    ("jpg", buf.getvalue()),
                    ("txt", caption.encode()),
                    ("json", json.dumps({"key": key}).encode()),
                ):
                    info = tarfile.TarInfo(f"{key:08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return f"{out}/{{00000..{shards - 1:05d}}}.tar"


def _ours(pattern: str, samples: int, batch: int, workers: int, transform, tokenizer) -> int:
    from .data import train_loader

    kw = {"world_size": 1, "rank": 0, "seed": 0, "epoch": 0, "num_workers": workers}
    loader = train_loader(
        pattern, num_samples=samples, global_batch=batch, image_transform=transform, tokenizer=tokenizer, **kw
    )
    return sum(len(keys) for _, _, keys in loader)


def _open_clip(pattern: str, samples: int, batch: int, workers: int, transform, tokenizer) -> int:
    import argparse

    from launchers.run_open_clip_train import prepare

    prepare()
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(
        train_data=pattern, train_num_samples=samples, batch_size=batch, workers=workers, world_size=1, seed=0,
        dataset_resampled=False, train_data_upsampling_factors=None, val_data=None, val_num_samples=None,
    )  # fmt: skip
    info = get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer)
    return sum(len(images) for images, _ in info.dataloader)


def _throughput(pattern: str, samples: int, batch: int, workers: int, which: str) -> tuple[float, float]:
    """``(samples/s, CPU ms per sample)`` of one epoch of ``which`` loader ("ours" | "open_clip"), from creating it
    to its last batch, with open_clip's ViT-B-32 train transform (224 px) and tokenizer. CPU time is this process's
    and its finished DataLoader workers' (less sensitive to other load on the machine than the rate)."""
    import resource
    import time

    from .compat import import_open_clip

    def cpu_s() -> float:
        return sum(
            r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        )

    open_clip = import_open_clip()
    transform, tokenizer = open_clip.image_transform(224, is_train=True), open_clip.get_tokenizer("ViT-B-32")
    start, cpu = time.perf_counter(), cpu_s()
    n = (_ours if which == "ours" else _open_clip)(pattern, samples, batch, workers, transform, tokenizer)
    wall, cpu = time.perf_counter() - start, cpu_s() - cpu
    if n != samples:
        raise RuntimeError(f"{which} delivered {n} samples, not {samples}")
    return n / wall, 1000 * cpu / n


def compare(pattern: str, samples: int, batch: int, workers: int, repeats: int) -> dict[str, float]:
    """Medians over ``repeats`` alternating runs of both loaders (so load from elsewhere hits both alike); each
    delivers the same ``samples``: a multiple of ``batch * workers`` (open_clip's epoch is whole batches per
    worker)."""
    import statistics

    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "open_clip": []}
    for _ in range(repeats):
        for which, out in runs.items():
            out.append(_throughput(pattern, samples, batch, workers, which))
    row = {}
    for which, out in runs.items():
        row[which] = statistics.median(rate for rate, _ in out)
        row[f"{which}_cpu_ms"] = statistics.median(ms for _, ms in out)
    return {**row, "ratio": row["ours"] / row["open_clip"]}


def read_epoch(pattern: str, samples: int, batch: int, world: int, workers: int, split: str) -> None:
    """Every rank's loader (in this process, one after the other) through one epoch; the bytes-read probe."""
    import torch

    from .data import train_loader

    for rank in range(world):
        kw = {"world_size": world, "rank": rank, "seed": 0, "epoch": 0, "num_workers": workers, "split": split}
        loader = train_loader(
            pattern, num_samples=samples, global_batch=batch, image_transform=lambda img: torch.zeros(1),
            tokenizer=lambda texts: torch.zeros(len(texts), 1, dtype=torch.long), **kw,
        )  # fmt: skip
        for _ in loader:
            pass


def main(argv: list[str] | None = None) -> int:
    import argparse
    import csv
    import json
    import platform
    import sys

    parser = argparse.ArgumentParser(prog="fastclip-ds bench-data", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the shards, CSV and markdown table")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--per-shard", type=int, default=1_250, help="1,250: the 8 shards divide over 8 streams")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per loader; the median is reported")
    parser.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4], help="IO amplification (none: skip)")
    args = parser.parse_args(argv)
    shard_dir = args.out / "shards"
    pattern = write_jpeg_shards(shard_dir, args.samples, args.per_shard)
    total = sum(p.stat().st_size for p in shard_dir.glob("*.tar"))
    rows = []
    for workers in args.workers:
        delivered = args.samples // (args.batch * workers) * args.batch * workers
        row = compare(pattern, delivered, args.batch, workers, args.repeats)
        rows.append({"measure": "samples_per_s", "workers": workers, "world_size": 1, "samples": delivered, **row})
    for world in args.worlds:
        for split in ("streams", *(["global"] if world == 2 else [])):
            code = (
                "import json, sys; from fastclip_ds.data_bench import read_epoch; read_epoch(**json.loads(sys.argv[1]))"
            )
            probe = {"pattern": pattern, "samples": args.samples, "batch": args.batch, "world": world, "workers": 2,
                     "split": split}  # fmt: skip
            read = shard_bytes_read([sys.executable, "-c", code, json.dumps(probe)], shard_dir)
            rows.append(
                {"measure": f"io_amplification_{split}", "workers": 2, "world_size": world, "ours": read / total}
            )
    fields = ["measure", "workers", "world_size", "samples", "ours", "open_clip", "ratio"]
    fields += ["ours_cpu_ms", "open_clip_cpu_ms"]
    with open(args.out / "bench_data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    machine = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs"
    lines = [
        f"{args.samples} JPEGs of 224-256 px ({total / args.samples / 1024:.0f} KiB each), {args.per_shard} per shard, "
        f"batch {args.batch}; {machine}; samples/s and CPU: median of {args.repeats} alternating runs",
        "",
        "| measure | workers | world size | ours | open_clip | ours / open_clip | CPU ms/sample ours | open_clip |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        values = (
            (f"{r['ours']:.0f}", f"{r['open_clip']:.0f}", f"{r['ratio']:.2f}", f"{r['ours_cpu_ms']:.2f}",
             f"{r['open_clip_cpu_ms']:.2f}")
            if "ratio" in r
            else (f"{r['ours']:.3f}", "", "", "", "")
        )  # fmt: skip
        lines.append(f"| {r['measure']} | {r['workers']} | {r['world_size']} | " + " | ".join(values) + " |")
    (args.out / "bench_data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
