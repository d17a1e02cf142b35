"""Zero-shot classification on a CLIP_benchmark-style webdataset split; ``fastclip-ds eval`` (any split type).

Dataset layout (CLIP_benchmark's ``wds/<name>``, as written by ``fastclip-ds data digits``)::

    ROOT/classnames.txt                            one class name per line
    ROOT/zeroshot_classification_templates.txt     one template per line, with ``{c}`` for the class name
    ROOT/test/nshards.txt, ROOT/test/0.tar ...     KEY.png|jpg|jpeg|webp + KEY.cls (integer label)

Metrics follow CLIP_benchmark: ``top1``, ``top5`` (top-min(5, C)), ``mean_per_class_recall`` (balanced accuracy
over the classes present in the split), and ``n`` (number of images). A tie counts in the image's favour: it is
right at k when fewer than k classes score strictly above its own (CLIP_benchmark's ``topk`` breaks ties
arbitrarily), as in retrieval.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_KEYS = "png;jpg;jpeg;webp"


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot data: missing {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"zero-shot data: {path} is empty")
    return lines


def read_split(root: Path) -> tuple[list[str], list[str], list[str]]:
    """``(classnames, templates, shard paths)`` of the test split under ``root``."""
    root = Path(root)
    classnames = _read_lines(root / "classnames.txt")
    templates = _read_lines(root / "zeroshot_classification_templates.txt")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"zero-shot data: template without '{{c}}' in {root}: {bad[0]!r}")
    return classnames, templates, split_shards(root, "zero-shot data")


def split_shards(root: Path, what: str) -> list[str]:
    """``root/test/{0..n-1}.tar`` as listed by ``root/test/nshards.txt`` (CLIP_benchmark's wds layout)."""
    nshards_file = Path(root) / "test" / "nshards.txt"
    try:
        nshards = int(_read_lines(nshards_file)[0])
    except ValueError:
        raise ValueError(f"{what}: {nshards_file} must hold an integer") from None
    shards = [str(Path(root) / "test" / f"{i}.tar") for i in range(nshards)]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {nshards_file} lists {nshards} shards but {missing[0]} is missing")
    return shards


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encode_images(model: torch.nn.Module, images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """L2-normalised float32 image features; the images are cast to the model's parameter dtype."""
    images = images.to(device=device, dtype=_param_dtype(model) if images.is_floating_point() else images.dtype)
    return F.normalize(model.encode_image(images).float(), dim=-1)


@torch.no_grad()
def zeroshot_classifier(
    model: torch.nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """``[d, C]`` class weights: per class, the mean of its normalised template embeddings, renormalised."""
    device = next(model.parameters()).device
    columns = []
    for name in classnames:
        tokens = tokenizer([t.format(c=name) for t in templates]).to(device)
        embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)
        columns.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


def _batches(shards: list[str], transform: Callable, batch_size: int) -> Iterable[tuple[torch.Tensor, list[int]]]:
    import webdataset as wds

    return (
        # every shard on this process, even inside a distributed job (rank 0 evaluates for everyone)
        wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        .decode("pil")
        .to_tuple(IMAGE_KEYS, "cls")
        .map_tuple(transform, int)  # webdataset decodes .cls to int
        .batched(batch_size, partial=True)
    )


def zeroshot_eval(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    root: Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Zero-shot top-1/top-5/mean-per-class-recall of ``model`` on ``root``'s test split (model mode restored)."""
    classnames, templates, shards = read_split(root)
    with inference(model):
        classifier = zeroshot_classifier(model, tokenizer, classnames, templates)
        k = min(5, len(classnames))
        labels, top1_hits, topk_hits = [], [], []
        for images, targets in _batches(shards, transform, batch_size):
            features = encode_images(model, images, device)
            targets = torch.as_tensor(targets, device=classifier.device)
            bad = targets[(targets < 0) | (targets >= len(classnames))]
            if bad.numel():
                raise ValueError(f"zero-shot data: label {bad[0].item()} outside 0..{len(classnames) - 1}")
            scores = features @ classifier
            rank = (scores > scores.gather(1, targets[:, None])).sum(dim=1)  # classes strictly above the label
            labels.append(targets)
            top1_hits.append(rank < 1)
            topk_hits.append(rank < k)
    if not labels:
        raise ValueError(f"zero-shot data: no samples in {root}/test")
    labels, top1, topk = torch.cat(labels), torch.cat(top1_hits).double(), torch.cat(topk_hits).double()
    recalls = [top1[labels == c].mean() for c in labels.unique()]
    return {
        "top1": top1.mean().item(),
        "top5": topk.mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
        "n": int(labels.numel()),
    }


def load_open_clip_checkpoint(checkpoint: Path, model_config: Path | None = None, model: str | None = None):
    """``(model, tokenizer, eval transform)`` loaded by open_clip from an exported checkpoint.

    The architecture is ``model`` (a registered name), or ``model_config`` (a model-config JSON), or by default
    the JSON beside the checkpoint (``model.pt`` -> ``model.json``, as ``fastclip-ds export`` writes it).
    """
    from fastclip_ds.model import open_clip_with_configs, resolve_model_config

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if model is None:
        model_config = Path(model_config) if model_config is not None else checkpoint.with_suffix(".json")
        if not model_config.is_file():
            raise FileNotFoundError(f"model config not found: {model_config} (pass --model-config or --model)")
        model, _ = resolve_model_config(str(model_config))
    open_clip = open_clip_with_configs()
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=str(checkpoint))
    return net, open_clip.get_tokenizer(model), preprocess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastclip-ds eval",
        description="Zero-shot evaluation of an open_clip checkpoint on a CLIP_benchmark-style wds split, by "
        "ROOT/dataset_type.txt: classification (the default; ROOT/classnames.txt, "
        "ROOT/zeroshot_classification_templates.txt, ROOT/test/{nshards.txt,0.tar,...} with .cls labels) or "
        "retrieval (ROOT/test shards with .txt captions, one per line). Prints one line of JSON: top1, top5, "
        "mean_per_class_recall, n (classification) or i2t_r1/5/10, t2i_r1/5/10, n_images, n_texts (retrieval).",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="open_clip checkpoint (fastclip-ds export)")
    arch = parser.add_mutually_exclusive_group()
    arch.add_argument("--model-config", type=Path, help="model-config JSON (default: the checkpoint's .json sibling)")
    arch.add_argument("--model", help="registered open_clip model name, e.g. ViT-B-32 or fastclip-tiny")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (CLIP_benchmark wds layout)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        model, tokenizer, preprocess = load_open_clip_checkpoint(args.checkpoint, args.model_config, args.model)
        from . import evaluate

        metrics = evaluate(model.to(args.device), tokenizer, preprocess, args.data, args.batch_size, args.device)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"fastclip-ds eval: error: {err}\n")
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
