"""Zero-shot image↔text retrieval on a CLIP_benchmark-style webdataset split.

Dataset layout (CLIP_benchmark's ``wds/<name>`` retrieval sets, e.g. ``wds_flickr30k``)::

    ROOT/dataset_type.txt                  the word ``retrieval``
    ROOT/test/nshards.txt, ROOT/test/0.tar ...   KEY.png|jpg|jpeg|webp + KEY.txt (one caption per line)

Metrics follow CLIP_benchmark, for k in (1, 5, 10): ``i2t_r{k}`` (image→text, CLIP_benchmark's
``text_retrieval_recall@k``): the fraction of images with at least one of their own captions among the k
highest-scoring captions; ``t2i_r{k}`` (text→image, ``image_retrieval_recall@k``): the fraction of captions whose
image is among the k highest-scoring images. Scores are cosine similarities. Ties count in the query's favour:
a positive at score s is within the top k when fewer than k candidates score strictly above s (CLIP_benchmark's
``topk`` breaks ties arbitrarily; real captions and images do not tie). Also ``n_images``, ``n_texts``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .zeroshot import IMAGE_KEYS, encode_images, inference, split_shards

KS = (1, 5, 10)


def read_retrieval_split(root: Path) -> list[str]:
    """Shard paths of the retrieval test split under ``root``."""
    return split_shards(root, "retrieval data")


def recall_at_k(scores: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k both ways from ``scores[t, i]`` (text t vs image i) and ``text_to_image[t]`` (caption t's image)."""
    n_texts, n_images = scores.shape
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({n_texts},)")
    if n_texts == 0 or n_images == 0:
        raise ValueError("retrieval: no images or no captions")
    rows = torch.arange(n_texts, device=scores.device)
    positive = scores[rows, text_to_image]
    t2i_rank = (scores > positive[:, None]).sum(dim=1)  # images strictly above the caption's own image
    best = torch.full((n_images,), -torch.inf, dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, text_to_image, positive, reduce="amax")  # each image's best own caption
    if torch.isinf(best).any():
        raise ValueError("retrieval: an image has no caption")
    i2t_rank = (scores > best[None, :]).sum(dim=0)  # captions strictly above the image's best own caption
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).double().mean().item()
        out[f"t2i_r{k}"] = (t2i_rank < k).double().mean().item()
    return out


def _batches(shards: list[str], transform: Callable, batch_size: int) -> Iterable[tuple[torch.Tensor, list[str]]]:
    import webdataset as wds

    return (
        wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        .decode("pil")
        .to_tuple(IMAGE_KEYS, "txt")
        .map_tuple(transform, lambda text: [c.strip() for c in text.splitlines() if c.strip()])
        .batched(batch_size, partial=True)
    )


def retrieval_eval(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    root: Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Image↔text R@1/5/10 of ``model`` on ``root``'s retrieval test split (model mode restored)."""
    shards = read_retrieval_split(root)
    image_features, text_features, text_to_image = [], [], []
    with inference(model):
        for images, captions in _batches(shards, transform, batch_size):
            start = sum(len(f) for f in image_features)
            image_features.append(encode_images(model, images, device))
            flat = [c for per_image in captions for c in per_image]
            if len(flat) == 0:
                continue
            text_features.append(F.normalize(model.encode_text(tokenizer(flat).to(device)).float(), dim=-1))
            text_to_image += [start + i for i, per_image in enumerate(captions) for _ in per_image]
    if not image_features:
        raise ValueError(f"retrieval data: no samples in {root}/test")
    if not text_features:
        raise ValueError(f"retrieval data: no captions in {root}/test")
    images, texts = torch.cat(image_features), torch.cat(text_features)
    index = torch.tensor(text_to_image, device=texts.device)
    return {**recall_at_k(texts @ images.T, index), "n_images": len(images), "n_texts": len(texts)}
