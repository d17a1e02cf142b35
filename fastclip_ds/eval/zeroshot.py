"""Zero-shot classification on a CLIP_benchmark wds split or an ImageNet-style folder; ``fastclip-ds eval``.

Dataset layouts (``split.layout`` picks by what ROOT holds)::

    ROOT/classnames.txt                            one class name per line
    ROOT/zeroshot_classification_templates.txt     one template per line, with ``{c}`` for the class name
    and either (CLIP_benchmark's ``wds/<name>``, as written by ``fastclip-ds data digits``)
    ROOT/test/nshards.txt, ROOT/test/0.tar ...     KEY.png|jpg|jpeg|webp + KEY.cls (integer label)
    or (ImageNet as usually held; torchvision's ImageFolder order)
    ROOT/val/<class>/<image>                       label i: the i-th class folder in sorted order, named by line i
                                                   of classnames.txt (for ImageNet: folders n01440764 ... sorted)

Metrics follow CLIP_benchmark: ``top1``, ``top5`` (top-min(5, C)), ``mean_per_class_recall`` (balanced accuracy
over the classes present in the split), and ``n`` (number of images). A tie counts in the image's favour: it is
right at k when fewer than k classes score strictly above its own (CLIP_benchmark's ``topk`` breaks ties
arbitrarily), as in retrieval.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import comm
from .split import Split, encode_split, inference, layout, read_folder, read_lines, read_wds, shard_map

WHAT = "zero-shot data"


def read_names(root: Path) -> tuple[list[str], list[str]]:
    """``(classnames, templates)`` of the classification split at ``root``."""
    root = Path(root)
    classnames = read_lines(root / "classnames.txt", WHAT)
    templates = read_lines(root / "zeroshot_classification_templates.txt", WHAT)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"{WHAT}: template without '{{c}}' in {root}: {bad[0]!r}")
    return classnames, templates


def read_split(root: Path) -> tuple[list[str], list[str], Split]:
    """``(classnames, templates, samples)`` of the classification split at ``root``, in either layout."""
    classnames, templates = read_names(root)
    if layout(root, WHAT) == "folder":
        return classnames, templates, read_folder(root, len(classnames), WHAT)
    return classnames, templates, read_wds(root, "cls", WHAT)


@torch.no_grad()
def zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str],
    lockstep: bool = False,
) -> torch.Tensor:
    """``[d, C]`` class weights: per class, the mean of its normalised template embeddings, renormalised. Each rank
    encodes its share of the classes (``shard_map``; ``lockstep`` under ZeRO-3)."""
    device = next(model.parameters()).device

    def run(units: list[list[int]]) -> Iterator[tuple[torch.Tensor]]:
        for (c,) in units:
            tokens = tokenizer([t.format(c=classnames[c]) for t in templates]).to(device)
            embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)
            yield (F.normalize(embeddings.mean(dim=0), dim=-1)[None],)

    (columns,) = shard_map([[c] for c in range(len(classnames))], run, lockstep, "eval_classes")
    return columns.T


def zeroshot_eval(
    model: torch.nn.Module,
    tokenizer: Callable,
    transform: Callable,
    root: Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    lockstep: bool = False,
) -> dict[str, float]:
    """Zero-shot top-1/top-5/mean-per-class-recall of ``model`` on ``root``'s split (model mode restored), on rank
    0 ({} on the other ranks, which encode their share); ``lockstep``: every rank runs as many forwards (ZeRO-3)."""
    classnames, templates, split = read_split(root)
    if not len(split):
        raise ValueError(f"{WHAT}: no samples in {root}")
    labels = torch.tensor(split.labels)
    bad = labels[(labels < 0) | (labels >= len(classnames))]
    if bad.numel():
        raise ValueError(f"{WHAT}: label {bad[0].item()} outside 0..{len(classnames) - 1} in {root}")
    with inference(model):
        classifier = zeroshot_classifier(model, tokenizer, classnames, templates, lockstep)
        (features,) = encode_split(model, split, transform, batch_size, device, num_workers, lockstep)
    if comm.rank() != 0:
        return {}
    scores = features @ classifier
    labels = labels.to(scores.device)
    rank = (scores > scores.gather(1, labels[:, None])).sum(dim=1)  # classes strictly above the label
    top1, topk = (rank < 1).double(), (rank < min(5, len(classnames))).double()
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
        description="Zero-shot evaluation of an open_clip checkpoint, by ROOT/dataset_type.txt: classification "
        "(the default; ROOT/classnames.txt, ROOT/zeroshot_classification_templates.txt, and either "
        "ROOT/test/{nshards.txt,0.tar,...} with .cls labels (CLIP_benchmark wds) or ROOT/val/<class>/<image> with "
        "classnames.txt naming the sorted class folders (ImageNet-style)) or retrieval (ROOT/test shards with .txt "
        "captions, one per line). Prints one line of JSON: top1, top5, "
        "mean_per_class_recall, n (classification) or i2t_r1/5/10, t2i_r1/5/10, n_images, n_texts (retrieval).",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="open_clip checkpoint (fastclip-ds export)")
    arch = parser.add_mutually_exclusive_group()
    arch.add_argument("--model-config", type=Path, help="model-config JSON (default: the checkpoint's .json sibling)")
    arch.add_argument("--model", help="registered open_clip model name, e.g. ViT-B-32 or fastclip-tiny")
    parser.add_argument("--data", type=Path, required=True, help="dataset root (wds or folder layout, see above)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images (default 0)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    try:
        model, tokenizer, preprocess = load_open_clip_checkpoint(args.checkpoint, args.model_config, args.model)
        from . import evaluate

        metrics = evaluate(
            model.to(args.device), tokenizer, preprocess, args.data, args.batch_size, args.device, args.workers
        )
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"fastclip-ds eval: error: {err}\n")
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
