"""Evaluation: zero-shot classification (``fastclip_ds.eval.zeroshot``); :func:`evaluate` is what training calls."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def evaluate(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    root: Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Every metric the dataset at ``root`` supports (CLIP_benchmark wds layout): zero-shot classification."""
    from .zeroshot import zeroshot_eval

    return zeroshot_eval(model, tokenizer, transform, root, batch_size=batch_size, device=device)
