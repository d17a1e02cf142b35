"""Caption a classification split into a retrieval split: ``python -m fastclip_ds.eval.captions SRC OUT``.

Reads a CLIP_benchmark classification split (``SRC/classnames.txt``, ``SRC/zeroshot_classification_templates.txt``,
``SRC/test`` shards with ``.cls`` labels) and writes the same images as a CLIP_benchmark retrieval split
(``OUT/dataset_type.txt`` = ``retrieval``, ``OUT/test`` shards with ``.txt`` captions, one per line): image i of
class c gets ``captions_per_image`` captions, the templates ``(i + j) mod T`` filled with c's name. Used to
exercise retrieval on the digits demo (``fastclip-ds data digits`` eval split); captions of one class repeat,
so the demo's recall measures class-level retrieval.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .split import IMAGE_EXTS, split_shards
from .zeroshot import WHAT, read_names


def write_retrieval_split(src: Path, out: Path, captions_per_image: int = 2, shard_size: int = 1000) -> Path:
    """Write ``out`` from ``src`` (see the module docstring); returns ``out``."""
    import webdataset as wds

    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    classnames, templates = read_names(Path(src))
    shards = split_shards(Path(src), WHAT)
    out = Path(out)
    (out / "test").mkdir(parents=True, exist_ok=True)
    samples = wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, empty_check=False)
    n, shard = 0, None
    try:
        for sample in samples:
            ext = next(e for e in IMAGE_EXTS if e in sample)
            label = int(sample["cls"])
            if not 0 <= label < len(classnames):
                raise ValueError(f"{sample['__url__']}: label {label} outside 0..{len(classnames) - 1}")
            texts = [templates[(n + j) % len(templates)].format(c=classnames[label]) for j in range(captions_per_image)]
            if n % shard_size == 0:
                if shard is not None:
                    shard.close()
                shard = wds.TarWriter(str(out / "test" / f"{n // shard_size}.tar"))
            shard.write({"__key__": sample["__key__"], ext: sample[ext], "txt": "\n".join(texts)})
            n += 1
    finally:
        if shard is not None:
            shard.close()
    if n == 0:
        raise ValueError(f"{src}/test holds no samples")
    (out / "test" / "nshards.txt").write_text(f"{(n + shard_size - 1) // shard_size}\n")
    (out / "dataset_type.txt").write_text("retrieval\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastclip_ds.eval.captions", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="classification split root (CLIP_benchmark wds layout)")
    parser.add_argument("out", type=Path, help="retrieval split root to write")
    parser.add_argument("--captions-per-image", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        out = write_retrieval_split(args.src, args.out, args.captions_per_image)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"captions: error: {err}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
