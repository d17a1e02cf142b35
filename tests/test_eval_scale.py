"""Evaluation that scales: 2 gloo ranks (each encoding its share) score exactly like 1, under ZeRO-3 too; the
ImageNet-style folder layout scores like the same images in CLIP_benchmark's wds layout."""

from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from fastclip_ds.eval import evaluate
from fastclip_ds.eval.split import layout
from fastclip_ds.eval.zeroshot import read_split, zeroshot_eval
from fastclip_ds.model import create_model
from fastclip_ds.multiproc import spawn

from .test_retrieval import CAPTIONS, PICTURES, write_retrieval


class Counting(torch.nn.Module):
    """``model`` counting the images and texts it encodes, and its forward calls."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.images, self.texts, self.calls = model, 0, 0, 0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.images, self.calls = self.images + len(images), self.calls + 1
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.texts, self.calls = self.texts + len(tokens), self.calls + 1
        return self.model.encode_text(tokens)


def _eval_ranks(rank: int, world: int, digits_eval: str, retrieval: str) -> dict:
    """On each rank: the metrics and the counts of evaluations of a plain model (free and lockstep), the ragged
    gather, and a ZeRO-3 engine's evaluation."""
    import deepspeed

    from fastclip_ds import comm

    out = {}
    rows = comm.all_gather_ragged([torch.full((rank + 1, 2), float(rank)), torch.arange(rank + 1)], "test")
    out["ragged"] = [t.tolist() for t in rows]
    bundle = create_model("fastclip-micro", seed=3)
    for name, root, batch_size, workers, lockstep in [
        ("digits", digits_eval, 50, 1, False),  # 397 images: 8 batches, 4 per rank (200 + 197 images); a worker
        ("retrieval", retrieval, 3, 0, False),  # 14 images: 5 batches, 3 + 2
        ("retrieval_lockstep", retrieval, 3, 0, True),  # rank 1 pads with a third batch
    ]:
        model, transform = Counting(bundle.model), bundle.eval_transform
        metrics = evaluate(model, bundle.tokenizer, transform, Path(root), batch_size, "cpu", workers, lockstep)
        out[name] = {"metrics": metrics, "images": model.images, "texts": model.texts, "calls": model.calls}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=bundle.model, config=config)  # parameters partitioned over the ranks
    transform, root = bundle.eval_transform, Path(digits_eval)
    out["zero3"] = evaluate(engine.module, bundle.tokenizer, transform, root, 80, "cpu", 0, True)
    return out


@pytest.mark.slow  # 1 then 2 spawned ranks, each evaluating 4 times (minutes under load: spawned workers)
def test_two_ranks_score_exactly_like_one(digits_root, tmp_path):
    # catches features gathered in the wrong order or twice, a rank encoding more than its share, metrics that depend
    # on the world size (batches composed per rank, repeated images deduplicated per rank), a ZeRO-3 evaluation that
    # hangs or misorders when the ranks have unequal shares, and rank 1 reporting metrics
    retrieval = write_retrieval(tmp_path / "ret", CAPTIONS, PICTURES)
    args = (str(digits_root / "eval"), str(retrieval))
    (one,) = spawn(1, _eval_ranks, args, timeout=600)
    two = spawn(2, _eval_ranks, args, timeout=600)
    assert two[0]["ragged"] == [[[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], [0, 0, 1]] == two[1]["ragged"]
    for name in ("digits", "retrieval", "retrieval_lockstep"):
        assert two[0][name]["metrics"] == one[name]["metrics"], name  # the same computation, so to the bit
        assert two[1][name]["metrics"] == {}, name
    assert one["digits"]["metrics"]["n"] == 397 and one["retrieval"]["metrics"]["n_images"] == 14
    # images: the fixed batches of 50 (resp. 3) dealt round-robin; texts: 10 classes x T templates, 5 classes per
    # rank; retrieval captions: 18 distinct, batches of 3 dealt 3 + 3
    templates = len((digits_root / "eval" / "zeroshot_classification_templates.txt").read_text().splitlines())
    assert [r["digits"]["images"] for r in two] == [200, 197] and one["digits"]["images"] == 397
    assert [r["digits"]["texts"] for r in two] == [5 * templates] * 2 and one["digits"]["texts"] == 10 * templates
    assert [r["retrieval"]["images"] for r in two] == [3 + 3 + 2, 3 + 3] and one["retrieval"]["images"] == 14
    assert [r["retrieval"]["texts"] for r in two] == [9, 9] and one["retrieval"]["texts"] == 18
    # lockstep (ZeRO-3): equal forward counts on both ranks; rank 1 runs batch 0 again and drops it
    assert [r["retrieval_lockstep"]["calls"] for r in two] == [3 + 3, 3 + 3]
    assert [r["retrieval_lockstep"]["images"] for r in two] == [8, 6 + 3]
    # ZeRO-3 (397 images in 5 batches of 80: rank 1 pads): DeepSpeed's partitioned linear layers round differently
    # from torch's, so up to one image of a near-tie may flip
    zero3, plain = two[0]["zero3"], one["digits"]["metrics"]
    assert zero3.keys() == plain.keys() and two[1]["zero3"] == {}
    assert all(abs(zero3[k] - plain[k]) <= 1 / 397 + 1e-12 for k in ("top1", "top5")), (zero3, plain)


def _digits_samples(root: Path) -> list[tuple[int, str, bytes]]:
    """``(label, key, png bytes)`` of the digits eval split, sorted by label then key (the folder layout's order)."""
    shards = sorted((root / "test").glob("*.tar"))
    samples = [s for url in shards for s in wds.WebDataset(str(url), shardshuffle=False, empty_check=False)]
    return sorted((int(s["cls"]), s["__key__"], s["png"]) for s in samples)


def _names(src: Path, dst: Path) -> None:
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (dst / name).write_bytes((src / name).read_bytes())


def test_folder_layout_scores_like_wds(digits_root, tmp_path):
    # catches folder labels not in sorted class-folder order (the folders are named unlike the classes, and their
    # sorted order differs from the creation order), files read in another order, or images decoded differently
    src = digits_root / "eval"
    samples = _digits_samples(src)
    folder, shards = tmp_path / "folder", tmp_path / "wds"
    for label in reversed(range(10)):  # created last-first: listing order is not sorted order
        (folder / "val" / f"n{label:08d}").mkdir(parents=True)
    (shards / "test").mkdir(parents=True)
    with wds.TarWriter(str(shards / "test" / "0.tar")) as sink:
        for label, key, png in samples:
            (folder / "val" / f"n{label:08d}" / f"{key}.png").write_bytes(png)
            sink.write({"__key__": key, "png": png, "cls": label})
    (shards / "test" / "nshards.txt").write_text("1\n")
    _names(src, folder)
    _names(src, shards)
    (folder / "val" / "n00000003" / "notes.txt").write_text("not an image\n")  # skipped, as ImageFolder does
    assert (layout(folder, "x"), layout(shards, "x")) == ("folder", "wds")
    bundle = create_model("fastclip-micro", seed=1)
    by_folder = zeroshot_eval(bundle.model, bundle.tokenizer, bundle.eval_transform, folder, batch_size=64)
    by_wds = zeroshot_eval(bundle.model, bundle.tokenizer, bundle.eval_transform, shards, batch_size=64)
    assert by_folder == by_wds and by_folder["n"] == 397  # the same images in the same batches: to the bit
    assert read_split(folder)[2].labels == [label for label, _, _ in samples]


def test_folder_layout_errors(tmp_path):
    root = tmp_path / "split"
    (root / "val" / "a").mkdir(parents=True)
    (root / "classnames.txt").write_text("a\nb\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of {c}\n")
    with pytest.raises(ValueError, match=r"has 1 class folders but classnames\.txt names 2"):
        read_split(root)
    (root / "test").mkdir()
    (root / "test" / "nshards.txt").write_text("0\n")
    with pytest.raises(ValueError, match=r"holds both test/nshards\.txt .* and val/"):
        read_split(root)
    with pytest.raises(FileNotFoundError, match=r"holds neither test/nshards\.txt .* nor val/"):
        layout(tmp_path, "zero-shot data")
    Image.new("RGB", (2, 2)).save(root / "val" / "a" / "x.png")
    (root / "dataset_type.txt").write_text("retrieval\n")
    (root / "test" / "nshards.txt").unlink()
    with pytest.raises(ValueError, match=r"folder layout .* is for classification"):
        evaluate(torch.nn.Linear(1, 1), str, str, root)
