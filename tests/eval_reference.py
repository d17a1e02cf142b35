"""Float64 references for the eval metrics, one sample at a time, written from the definitions (not from
``fastclip_ds.eval``). Our pipeline encodes in float32 batches, whose rounding depends on the batch and the CPU, so
a reference gives each metric as bounds: candidates within ``TOL`` of the positive may order either way."""

from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds

TOL = 1e-4  # cosines closer than this may order either way between float32 pipelines (rounding is about 1e-6)


def rank_bounds(scores: list[float], positive: float, tied: list[bool]) -> tuple[int, int]:
    """(candidates surely above ``positive``, candidates possibly above it) under float32 rounding; a candidate
    that is the same input as the positive (``tied``, the positive itself included) ties it exactly, and a tie
    counts in the query's favour."""
    surely = sum(s > positive + TOL for s, t in zip(scores, tied, strict=True) if not t)
    possibly = sum(s > positive - TOL for s, t in zip(scores, tied, strict=True) if not t)
    return surely, possibly


def bounded(ranks: list[tuple[int, int]], k: int) -> tuple[float, float]:
    """(lowest, highest) recall@k that the rank bounds allow."""
    return sum(hi < k for _, hi in ranks) / len(ranks), sum(lo < k for lo, _ in ranks) / len(ranks)


def within(got: dict[str, float], bounds: dict[str, tuple[float, float]]) -> bool:
    """Whether every metric of ``got`` lies in its bounds (and no metric is missing or extra)."""
    return got.keys() == bounds.keys() and all(lo <= got[key] <= hi for key, (lo, hi) in bounds.items())


def zeroshot_reference(model, tokenizer, transform, root: Path) -> dict[str, tuple[float, float]]:
    """Zero-shot top1, top5 and mean per-class recall of ``model`` (in eval mode) on ``root`` as bounds; ``n`` as
    (n, n)."""
    assert not model.training, "the reference scores the model in eval mode"
    classnames = (root / "classnames.txt").read_text().split()
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        columns = []
        for c in classnames:
            e = F.normalize(model.encode_text(tokenizer([t.format(c=c) for t in templates])).double(), dim=-1)
            columns.append(F.normalize(e.mean(0), dim=0))
        classifier = torch.stack(columns, dim=1)
        ranks, labels = [], []
        for url in sorted((root / "test").glob("*.tar")):
            for s in wds.WebDataset(str(url), shardshuffle=False, empty_check=False).decode("pil"):
                feature = F.normalize(model.encode_image(transform(s["png"])[None].to(dtype))[0].double(), dim=0)
                scores, label = (feature @ classifier).tolist(), int(s["cls"])
                ranks.append(rank_bounds(scores, scores[label], [c == label for c in range(len(classnames))]))
                labels.append(label)
    per_class = [bounded([r for r, y in zip(ranks, labels, strict=True) if y == c], 1) for c in sorted(set(labels))]
    return {
        "top1": bounded(ranks, 1),
        "top5": bounded(ranks, min(5, len(classnames))),
        "mean_per_class_recall": tuple(sum(b[i] for b in per_class) / len(per_class) for i in (0, 1)),
        "n": (len(labels),) * 2,
    }


def retrieval_reference(model, tokenizer, transform, root: Path, ks=(1, 5, 10)) -> dict[str, tuple[float, float]]:
    """Image↔text recall@k of ``model`` (in eval mode) on ``root`` as bounds (samples with the same caption text or
    the same pixels tie); ``n_images``, ``n_texts`` as (n, n)."""
    assert not model.training, "the reference scores the model in eval mode"
    images, pixels, texts, captions, owner = [], [], [], [], []
    with torch.no_grad():
        for shard in sorted((root / "test").glob("*.tar")):
            for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False).decode("pil"):
                image = sample["jpg"] if "jpg" in sample else sample["png"]
                images.append(model.encode_image(transform(image)[None])[0].double())
                pixels.append(image.tobytes())
                for caption in sample["txt"].splitlines():
                    texts.append(model.encode_text(tokenizer([caption]))[0].double())
                    captions.append(caption)
                    owner.append(len(images) - 1)
    s = (F.normalize(torch.stack(texts), dim=-1) @ F.normalize(torch.stack(images), dim=-1).T).tolist()
    t2i = [rank_bounds(row, row[owner[t]], [p == pixels[owner[t]] for p in pixels]) for t, row in enumerate(s)]
    i2t = []
    for i in range(len(images)):
        own = {captions[t] for t in range(len(texts)) if owner[t] == i}
        column = [s[t][i] for t in range(len(texts))]
        best = max(column[t] for t in range(len(texts)) if owner[t] == i)
        i2t.append(rank_bounds(column, best, [c in own for c in captions]))
    out = {}
    for k in ks:
        out[f"i2t_r{k}"], out[f"t2i_r{k}"] = bounded(i2t, k), bounded(t2i, k)
    return out | {"n_images": (len(images),) * 2, "n_texts": (len(texts),) * 2}
