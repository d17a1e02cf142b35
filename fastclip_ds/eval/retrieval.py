"""Zero-shot image↔text retrieval on a CLIP_benchmark-style webdataset split (sharded: ``split.shard_map``).

Dataset layout (CLIP_benchmark's ``wds/<name>`` retrieval sets, e.g. ``wds_flickr30k``)::

    ROOT/dataset_type.txt                  the word ``retrieval``
    ROOT/test/nshards.txt, ROOT/test/0.tar ...   KEY.png|jpg|jpeg|webp + KEY.txt (one caption per line)

Metrics follow CLIP_benchmark, for k in (1, 5, 10): ``i2t_r{k}`` (image→text, CLIP_benchmark's
``text_retrieval_recall@k``): the fraction of images with at least one of their own captions among the k
highest-scoring captions; ``t2i_r{k}`` (text→image, ``image_retrieval_recall@k``): the fraction of captions whose
image is among the k highest-scoring images. Scores are cosine similarities. Also ``n_images``, ``n_texts``.

Identical inputs score identically (the rule that makes the numbers independent of the batch size, the world size
and the CPU): each distinct caption (by its token ids) is encoded once per split and each distinct image (by its
preprocessed pixels) takes the feature of its first sample, and every sample's scores are read from the distinct
inputs' score matrix, so repeated captions or images tie bit for bit; a tie counts in the query's favour: a
positive at score s is within the top k when fewer than k candidates score strictly above s (CLIP_benchmark's
``topk`` breaks ties arbitrarily, so repeated captions such as class templates would otherwise rank by float32
rounding noise, which differs between batch compositions and CPUs). Distinct inputs whose cosines differ by less
than float32 rounding (about 1e-6) can still rank differently on another machine, as with any float metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import comm
from .split import Split, chunks, encode_split, inference, layout, read_wds, shard_map

WHAT = "retrieval data"
KS = (1, 5, 10)


def read_retrieval_split(root: Path) -> Split:
    """The samples of the retrieval split under ``root`` (wds layout only)."""
    if layout(root, WHAT) == "folder":
        raise ValueError(f"{WHAT}: {root}: the folder layout (val/) is for classification; retrieval needs test/")
    return read_wds(root, "txt", WHAT)


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


def retrieval_eval(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    root: Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    lockstep: bool = False,
) -> dict[str, float]:
    """Image↔text R@1/5/10 of ``model`` on ``root``'s retrieval test split (model mode restored), on rank 0 ({} on
    the other ranks, which encode their share); one feature per distinct image and caption (module docstring)."""
    split = read_retrieval_split(root)
    if not len(split):
        raise ValueError(f"{WHAT}: no samples in {root}/test")
    captions = [c for texts in split.captions for c in texts]
    if not captions:
        raise ValueError(f"{WHAT}: no captions in {root}/test")
    text_to_image = torch.tensor([n for n, texts in enumerate(split.captions) for _ in texts])
    tokens, text_of_caption = torch.unique(tokenizer(captions), dim=0, return_inverse=True)

    def run(units: list[list[int]]) -> Iterator[tuple[torch.Tensor]]:
        for unit in units:
            yield (F.normalize(model.encode_text(tokens[unit].to(device)).float(), dim=-1),)

    with inference(model):
        features, digests = encode_split(model, split, transform, batch_size, device, num_workers, lockstep, True)
        (text_features,) = shard_map(chunks(len(tokens), batch_size), run, lockstep, "eval_texts")
    if comm.rank() != 0:
        return {}
    first: dict[bytes, int] = {}  # image digest -> its first sample: the feature of every sample with that image
    image_of_sample = [first.setdefault(key.tobytes(), n) for n, key in enumerate(digests.cpu().numpy())]
    columns, image_of_sample = torch.tensor(image_of_sample).unique(return_inverse=True)
    distinct = text_features @ features[columns.to(features.device)].T  # [distinct captions, distinct images]
    scores = distinct[text_of_caption.to(distinct.device)][:, image_of_sample.to(distinct.device)]
    return {**recall_at_k(scores, text_to_image.to(scores.device)), "n_images": len(split), "n_texts": len(captions)}
