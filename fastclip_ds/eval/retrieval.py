"""Zero-shot image↔text retrieval on a CLIP_benchmark-style webdataset split.

Dataset layout (CLIP_benchmark's ``wds/<name>`` retrieval sets, e.g. ``wds_flickr30k``)::

    ROOT/dataset_type.txt                  the word ``retrieval``
    ROOT/test/nshards.txt, ROOT/test/0.tar ...   KEY.png|jpg|jpeg|webp + KEY.txt (one caption per line)

Metrics follow CLIP_benchmark, for k in (1, 5, 10): ``i2t_r{k}`` (image→text, CLIP_benchmark's
``text_retrieval_recall@k``): the fraction of images with at least one of their own captions among the k
highest-scoring captions; ``t2i_r{k}`` (text→image, ``image_retrieval_recall@k``): the fraction of captions whose
image is among the k highest-scoring images. Scores are cosine similarities. Also ``n_images``, ``n_texts``.

Identical inputs score identically (the rule that makes the numbers independent of the batch size and the CPU):
each distinct caption (by its token ids) and each distinct image (by its preprocessed pixels) is encoded once per
split, and every sample's scores are read from the distinct inputs' score matrix, so repeated captions or images
tie bit for bit; a tie counts in the query's favour: a positive at score s is within the top k when fewer than k
candidates score strictly above s (CLIP_benchmark's ``topk`` breaks ties arbitrarily, so repeated captions such
as class templates would otherwise rank by float32 rounding noise, which differs between batch compositions and
CPUs). Distinct inputs whose cosines differ by less than float32 rounding (about 1e-6) can still rank differently
on another machine, as with any float metric.
"""

from __future__ import annotations

import hashlib
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


def _digest(image: torch.Tensor) -> bytes:
    """Identity of a preprocessed image: its shape, dtype and pixel bytes."""
    pixels = image.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(f"{tuple(image.shape)}{image.dtype}".encode() + pixels.tobytes(), digest_size=16).digest()


def retrieval_eval(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    root: Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Image↔text R@1/5/10 of ``model`` on ``root``'s retrieval test split (model mode restored); each distinct
    image and caption is encoded once (see the module docstring)."""
    shards = read_retrieval_split(root)
    image_ids: dict[bytes, int] = {}
    image_features, image_of_sample, captions, text_to_image = [], [], [], []
    with inference(model):
        for images, per_sample in _batches(shards, transform, batch_size):
            for n, texts in enumerate(per_sample, start=len(image_of_sample)):
                captions += texts
                text_to_image += [n] * len(texts)
            fresh = []
            for n, key in enumerate(map(_digest, images)):
                if key not in image_ids:
                    image_ids[key] = len(image_ids)
                    fresh.append(n)
                image_of_sample.append(image_ids[key])
            if fresh:
                image_features.append(encode_images(model, images[fresh], device))
        if not image_of_sample:
            raise ValueError(f"retrieval data: no samples in {root}/test")
        if not captions:
            raise ValueError(f"retrieval data: no captions in {root}/test")
        tokens, text_of_caption = torch.unique(tokenizer(captions), dim=0, return_inverse=True)
        text_features = torch.cat(
            [F.normalize(model.encode_text(chunk.to(device)).float(), dim=-1) for chunk in tokens.split(batch_size)]
        )
    distinct = text_features @ torch.cat(image_features).T  # [distinct captions, distinct images]
    scores = distinct[text_of_caption.to(distinct.device)][:, torch.tensor(image_of_sample, device=distinct.device)]
    index = torch.tensor(text_to_image, device=scores.device)
    return {**recall_at_k(scores, index), "n_images": len(image_of_sample), "n_texts": len(captions)}
