"""Zero-shot classifier and metrics (hand-computed, stub encoders), bf16 models, and the ``eval`` CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from fastclip_ds.eval.zeroshot import main, read_split, zeroshot_classifier, zeroshot_eval
from fastclip_ds.model import create_model, to_open_clip_state_dict

from .eval_reference import within, zeroshot_reference


class StubCLIP(torch.nn.Module):
    """Looks up fixed embeddings: texts by their index in ``texts``, images by the id stored in their pixel."""

    def __init__(self, texts: dict[str, list[float]], images: list[list[float]]):
        super().__init__()
        self.vocab = list(texts)
        self.register_buffer("text_table", torch.tensor(list(texts.values()), dtype=torch.float64))
        self.register_buffer("image_table", torch.tensor(images, dtype=torch.float64))
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the model's dtype: images are cast to it

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.vocab.index(t) for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_table[tokens]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == self.anchor.dtype
        return self.image_table[images.long()]


def pixel_id(image: Image.Image) -> torch.Tensor:
    return torch.tensor(float(image.getpixel((0, 0))[0]))


def write_split(root: Path, classnames: list[str], templates: list[str], labels: list[int], nshards: int) -> Path:
    """CLIP_benchmark wds layout; image i is a 2x2 PNG whose red channel is i."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    (root / "test" / "nshards.txt").write_text(f"{nshards}\n")
    per_shard = math.ceil(len(labels) / nshards)
    for shard in range(nshards):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as sink:
            for i in range(shard * per_shard, min(len(labels), (shard + 1) * per_shard)):
                sink.write({"__key__": f"s{i:04d}", "png": Image.new("RGB", (2, 2), (i, 0, 0)), "cls": labels[i]})
    return root


def unit(i: int, dim: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(dim)]


def test_classifier_averages_normalised_template_embeddings():
    # class c: templates embed to 2*e_c (long) and e_{c+1}; normalising first weighs them equally
    e = [unit(i, 3) for i in range(3)]
    texts = {}
    for i, name in enumerate("ab"):
        texts[f"t1 {name}"] = [2 * x for x in e[i]]
        texts[f"t2 {name}"] = e[i + 1]
    stub = StubCLIP(texts, images=[[0.0, 0.0, 0.0]])
    weights = zeroshot_classifier(stub, stub.tokenize, ["a", "b"], ["t1 {c}", "t2 {c}"])
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[s, 0.0], [s, s], [0.0, s]], dtype=torch.float64)
    assert weights.shape == (3, 2)
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-7)


def test_metrics_hand_computed(tmp_path):
    # 7 classes; templates e_c +- 0.5 e_{c+1} average to e_c, so the classifier is the identity and an image
    # embedding is its vector of class scores. (label, rank of the label among the 7 scores) per image:
    cases = [(0, 1), (0, 2), (1, 1), (2, 6), (2, 1), (3, 5), (3, 7)]
    num_classes = 7
    classnames = [f"class{c}" for c in range(num_classes)]
    texts = {}
    for c, name in enumerate(classnames):
        nxt = unit((c + 1) % num_classes, num_classes)
        texts[f"plus {name}"] = [x + 0.5 * y for x, y in zip(unit(c, num_classes), nxt, strict=True)]
        texts[f"minus {name}"] = [x - 0.5 * y for x, y in zip(unit(c, num_classes), nxt, strict=True)]
    images = []
    for label, rank in cases:
        others = [c for c in range(num_classes) if c != label]
        order = [*others[: rank - 1], label, *others[rank - 1 :]]  # classes by decreasing score
        scores = [0.0] * num_classes
        for position, c in enumerate(order):
            scores[c] = float(num_classes - position)
        images.append(scores)
    stub = StubCLIP(texts, images)
    root = write_split(tmp_path / "split", classnames, ["plus {c}", "minus {c}"], [lab for lab, _ in cases], 2)
    weights = zeroshot_classifier(stub, stub.tokenize, classnames, ["plus {c}", "minus {c}"])
    torch.testing.assert_close(weights.double(), torch.eye(num_classes, dtype=torch.float64), rtol=0, atol=1e-7)

    stub.train()
    metrics = zeroshot_eval(stub, stub.tokenize, pixel_id, root, batch_size=3)
    assert stub.training  # mode restored
    # top-1 hits: images 0, 2, 4; top-5 hits: ranks <= 5 (images 0, 1, 2, 4, 5)
    # per-class recall: class 0 1/2, class 1 1/1, class 2 1/2, class 3 0/2 (classes 4-6 absent)
    assert metrics == pytest.approx({"top1": 3 / 7, "top5": 5 / 7, "mean_per_class_recall": 0.5, "n": 7}, abs=1e-12)


def test_top5_is_top_c_for_fewer_than_5_classes(tmp_path):
    texts = {"a": [1.0, 0.0], "b": [0.0, 1.0]}
    stub = StubCLIP(texts, images=[[0.0, 1.0], [0.0, 1.0]])
    root = write_split(tmp_path / "split", ["a", "b"], ["{c}"], [0, 1], 1)
    metrics = zeroshot_eval(stub, stub.tokenize, pixel_id, root)
    assert metrics == {"top1": 0.5, "top5": 1.0, "mean_per_class_recall": 0.5, "n": 2}


def test_bad_splits(tmp_path):
    stub = StubCLIP({"a": [1.0], "b": [1.0]}, images=[[1.0]] * 3)
    with pytest.raises(FileNotFoundError, match=r"missing .*classnames\.txt"):
        read_split(tmp_path)
    root = write_split(tmp_path / "no-placeholder", ["a", "b"], ["a photo"], [0], 1)
    with pytest.raises(ValueError, match="template without"):
        read_split(root)
    root = write_split(tmp_path / "short", ["a", "b"], ["{c}"], [0], 1)
    (root / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(FileNotFoundError, match=r"lists 2 shards but .*1\.tar is missing"):
        read_split(root)
    root = write_split(tmp_path / "empty", ["a", "b"], ["{c}"], [], 1)
    with pytest.raises(ValueError, match="no samples"):
        zeroshot_eval(stub, stub.tokenize, pixel_id, root)
    root = write_split(tmp_path / "not-int", ["a", "b"], ["{c}"], ["one"], 1)
    with pytest.raises(ValueError, match=r"0\.tar: sample 's0000': label 'one' is not an integer"):
        read_split(root)
    root = write_split(tmp_path / "label", ["a", "b"], ["{c}"], [0, 1, 2], 1)
    with pytest.raises(ValueError, match=r"label 2 outside 0\.\.1"):
        zeroshot_eval(stub, stub.tokenize, pixel_id, root)


def test_ties_count_in_the_images_favour(tmp_path):
    # classes a and b embed alike and image 0 scores them equally: right for either label (topk would pick one)
    stub = StubCLIP({"a": [1.0, 0.0], "b": [1.0, 0.0], "c": [0.0, 1.0]}, images=[[1.0, 0.0]])
    for label in (0, 1):
        root = write_split(tmp_path / f"label{label}", ["a", "b", "c"], ["{c}"], [label], 1)
        assert zeroshot_eval(stub, stub.tokenize, pixel_id, root)["top1"] == 1.0


def test_bf16_model_ranks_in_float32(tmp_path):
    # bf16 embeddings whose cosines differ by 2e-4 (class b above the label a), which bf16 arithmetic rounds to a
    # tie: catches features, classifier or scores left in the model's bf16 (the tie would count as a top-1 hit)
    stub = StubCLIP({"a": [1.0, 0.0], "b": [math.cos(0.04), math.sin(0.04)]}, images=[[math.cos(0.025), 0.025]])
    stub = stub.bfloat16()
    bf16_scores = F.normalize(stub.image_table, dim=-1) @ F.normalize(stub.text_table, dim=-1).T
    assert bf16_scores[0, 0] == bf16_scores[0, 1]  # the premise: in bf16 the two classes tie
    root = write_split(tmp_path / "split", ["a", "b"], ["{c}"], [0], 1)
    metrics = zeroshot_eval(stub, stub.tokenize, pixel_id, root)
    assert metrics == {"top1": 0.0, "top5": 1.0, "mean_per_class_recall": 0.0, "n": 1}


def test_bf16_model_on_digits(digits_root):
    # a real bf16 open_clip model (images cast to bf16 for its convolution) scored like its float64 reference; one
    # image per batch, as in the reference, since bf16 activations of other batch shapes round differently (2^-8)
    model = create_model("fastclip-micro", seed=0)
    model, tokenizer, transform = model.model.bfloat16().eval(), model.tokenizer, model.eval_transform
    root = digits_root / "eval"  # the digits writer's CLIP_benchmark split
    want = zeroshot_reference(model, tokenizer, transform, root)
    assert all(hi - lo < 0.01 for lo, hi in want.values()), want  # few near-ties: the bounds pin the metrics
    assert within(zeroshot_eval(model, tokenizer, transform, root, batch_size=1), want)


def test_cli_scores_exported_checkpoint_like_in_process(digits_root, tmp_path, capsys):
    bundle = create_model("fastclip-micro", seed=5)
    checkpoint = tmp_path / "zs-micro.pt"
    torch.save({"state_dict": to_open_clip_state_dict(bundle.model.state_dict()), "epoch": 1}, checkpoint)
    checkpoint.with_suffix(".json").write_text(json.dumps(bundle.config))
    root = digits_root / "eval"  # the digits writer's CLIP_benchmark split

    # the same weights and batches as in process: the same computation, so the same numbers to the bit
    assert main(["--checkpoint", str(checkpoint), "--data", str(root), "--batch-size", "100"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli == zeroshot_eval(bundle.model, bundle.tokenizer, bundle.eval_transform, root, batch_size=100)
    by_name = ["--checkpoint", str(checkpoint), "--model", "fastclip-micro", "--data", str(root), "--batch-size", "100"]
    assert main(by_name) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == cli

    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "absent.pt"), "--data", str(root)])
    assert exit_info.value.code == 2
    assert "checkpoint not found" in capsys.readouterr().err
