"""Evaluation: zero-shot classification (``zeroshot``) and image↔text retrieval (``retrieval``) on CLIP_benchmark
wds splits or ImageNet-style folders (``split``: layouts, sharded encoding); :func:`evaluate` (what training calls)
picks by the split's type. In a process group every rank encodes its share and rank 0 computes the metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

DATASET_TYPES = ("classification", "retrieval")


def dataset_type(root: Path) -> str:
    """``ROOT/dataset_type.txt`` (CLIP_benchmark's convention), ``classification`` when the file is absent."""
    path = Path(root) / "dataset_type.txt"
    if not path.is_file():
        return "classification"
    kind = path.read_text().strip().lower()
    if kind not in DATASET_TYPES:
        raise ValueError(f"eval data: {path} says {kind!r}; supported: {', '.join(DATASET_TYPES)}")
    return kind


def evaluate(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    root: Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    lockstep: bool = False,
) -> dict[str, float]:
    """Every metric the split at ``root`` supports: zero-shot top1/top5/mean_per_class_recall (classification)
    or i2t_r1/5/10 and t2i_r1/5/10 (retrieval), on rank 0 ({} on the other ranks). Collective in a process group:
    every rank calls it; ``lockstep`` (ZeRO-3) makes every rank run as many forwards; ``num_workers`` DataLoader
    workers per rank decode the images."""
    from .retrieval import retrieval_eval
    from .zeroshot import zeroshot_eval

    run = retrieval_eval if dataset_type(root) == "retrieval" else zeroshot_eval
    return run(model, tokenizer, transform, root, batch_size, device, num_workers, lockstep)
