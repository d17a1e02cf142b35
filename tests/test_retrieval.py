"""Retrieval metrics (hand-computed), the shard pipeline vs a per-sample float64 reference, ``evaluate``'s dispatch,
the captions writer, and a briefly trained exported checkpoint scored by our eval vs open_clip loaded directly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from fastclip_ds.eval import dataset_type, evaluate
from fastclip_ds.eval.captions import write_retrieval_split
from fastclip_ds.eval.retrieval import recall_at_k, retrieval_eval
from fastclip_ds.eval.zeroshot import main as eval_main
from fastclip_ds.model import create_model, open_clip_with_configs
from fastclip_ds.multiproc import free_port

from .eval_reference import retrieval_reference, within, zeroshot_reference


def test_recall_hand_computed():
    # texts 0, 1 caption image 0; text 2 image 1; text 3 image 2
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.4, 0.3, 0.6], [0.1, 0.7, 0.7]])
    # t2i ranks of the own image: t0 0, t1 2, t2 2, t3 0 (the 0.7 tie counts in the text's favour)
    # i2t: image 0's best own caption t0 (0.9) rank 0; image 1's t2 (0.3) has 0.8, 0.7 above: rank 2; image 2 rank 0
    got = recall_at_k(scores, torch.tensor([0, 0, 1, 2]), ks=(1, 2, 3))
    assert got == pytest.approx({"t2i_r1": 0.5, "t2i_r2": 0.5, "t2i_r3": 1.0, "i2t_r1": 2 / 3, "i2t_r2": 2 / 3,
                                 "i2t_r3": 1.0})  # fmt: skip


def test_recall_errors():
    with pytest.raises(ValueError, match="expected"):
        recall_at_k(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0, 1]))


def write_retrieval(root: Path, captions: list[list[str]], pictures: list[int] | None = None) -> Path:
    """A retrieval split, two shards; sample i's 32x32 image is the gradient shifted by ``pictures[i]`` (default i),
    so samples with the same picture hold the same pixels."""
    pictures = list(range(len(captions))) if pictures is None else pictures
    (root / "test").mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    (root / "test" / "nshards.txt").write_text("2\n")
    half = (len(captions) + 1) // 2
    for shard in range(2):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as sink:
            for i in range(shard * half, min(len(captions), (shard + 1) * half)):
                p = pictures[i]
                img = Image.new("RGB", (32, 32))
                img.putdata(
                    [((x * 8 + p * 40) % 256, (y * 8) % 256, (p * 70) % 256) for y in range(32) for x in range(32)]
                )
                sink.write({"__key__": f"{i:04d}", "png": img, "txt": "\n".join(captions[i])})
    return root


class BatchNoise(torch.nn.Module):
    """``model`` whose features carry a 1e-5 relative error that depends on the batch (its length and the row's
    place in it): float32 rounding as another batch composition or CPU makes it, but large enough to flip any
    exact tie on every machine."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def _perturb(features: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(len(features)))
        return features + 1e-5 * features.norm(dim=-1, keepdim=True) * noise / features.shape[-1] ** 0.5

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._perturb(self.model.encode_image(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._perturb(self.model.encode_text(tokens))


# five samples share one caption (and samples 12-13 repeat the pixels of samples 0-1 with captions of their own):
# the repeats tie exactly, so their recall must not depend on how rounding happens to order them
CAPTIONS = [[f"a photo number {i}", f"picture {i}"] for i in range(7)] + [["one caption only"]] * 5
CAPTIONS += [["a copy of photo 0"], ["a copy of photo 1", "copy 1"]]
PICTURES = [*range(12), 0, 1]


def test_retrieval_eval_matches_per_sample_reference(tmp_path):
    # catches captions paired with the wrong image across batches and shards, wrong ranks or normalisation, and
    # repeated captions or images that do not tie
    root = write_retrieval(tmp_path / "ret", CAPTIONS, PICTURES)
    bundle = create_model("fastclip-micro", seed=3)
    bundle.model.eval()
    want = retrieval_reference(bundle.model, bundle.tokenizer, bundle.eval_transform, root)
    # the synthetic split is well separated: no distinct inputs within TOL, so every metric has one exact value
    assert all(lo == hi for lo, hi in want.values()), want
    assert want["n_images"] == (14, 14) and want["n_texts"] == (22, 22)
    got = retrieval_eval(bundle.model, bundle.tokenizer, bundle.eval_transform, root, batch_size=5)
    assert got == {key: lo for key, (lo, _) in want.items()}
    assert evaluate(bundle.model, bundle.tokenizer, bundle.eval_transform, root, batch_size=64) == got


@pytest.mark.parametrize("noisy", [False, True])
def test_retrieval_metric_independent_of_batch_size(tmp_path, noisy):
    # catches a metric that encodes repeated captions or images separately: rounding that differs between batch
    # compositions then breaks their ties one way or the other (``noisy`` makes that rounding large and certain)
    root = write_retrieval(tmp_path / "ret", CAPTIONS, PICTURES)
    bundle = create_model("fastclip-micro", seed=3)
    bundle.model.eval()
    model = BatchNoise(bundle.model) if noisy else bundle.model
    want = retrieval_reference(bundle.model, bundle.tokenizer, bundle.eval_transform, root)
    for batch_size in (1, 5, 64):
        got = retrieval_eval(model, bundle.tokenizer, bundle.eval_transform, root, batch_size=batch_size)
        assert got == {key: lo for key, (lo, _) in want.items()}, batch_size


def test_dataset_type_dispatch(tmp_path, digits_root):
    assert dataset_type(tmp_path) == "classification"  # CLIP_benchmark's default when the file is absent
    assert dataset_type(digits_root / "eval") == "classification"
    (tmp_path / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ValueError, match="multilabel"):
        dataset_type(tmp_path)


def test_captions_writer(tmp_path, digits_root):
    out = write_retrieval_split(digits_root / "eval", tmp_path / "ret", captions_per_image=3, shard_size=150)
    assert dataset_type(out) == "retrieval"
    assert (out / "test" / "nshards.txt").read_text() == "3\n"
    classnames = (digits_root / "eval" / "classnames.txt").read_text().split()
    templates = (digits_root / "eval" / "zeroshot_classification_templates.txt").read_text().splitlines()
    shards = sorted((digits_root / "eval" / "test").glob("*.tar"))
    src = [s for url in shards for s in wds.WebDataset(str(url), shardshuffle=False, empty_check=False)]
    dst = [s for i in range(3) for s in wds.WebDataset(str(out / "test" / f"{i}.tar"), shardshuffle=False)]
    assert len(dst) == len(src) == 397
    for n, (a, b) in enumerate(zip(src, dst, strict=True)):
        assert a["__key__"] == b["__key__"] and a["png"] == b["png"]
        name = classnames[int(a["cls"])]
        assert b["txt"].decode().splitlines() == [templates[(n + j) % len(templates)].format(c=name) for j in range(3)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_root) -> Path:
    """fastclip-micro trained 150 steps on the digits shards (1 rank, DeepSpeed), exported to model.pt."""
    from fastclip_ds import digits
    from fastclip_ds.export import export_checkpoint

    run = tmp_path_factory.mktemp("trained") / "run"
    sets = {
        "model.config": "fastclip-micro", "data.train": digits.train_pattern(digits_root), "eval.data":
        str(digits_root / "eval"), "train.global_batch_size": 64, "train.max_steps": 150, "train.warmup_steps": 5,
        "train.lr": 2e-3, "train.output_dir": str(run), "loss.impl": "dense",
    }  # fmt: skip
    env = os.environ | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "fastclip_ds.train", *(x for k, v in sets.items() for x in ("--set", f"{k}={v}"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return export_checkpoint(run, run.parent / "model.pt")


def _direct_open_clip(checkpoint: Path):
    """The same weights loaded by open_clip's own functions, no fastclip_ds loader involved."""
    open_clip = open_clip_with_configs()
    model, _, preprocess = open_clip.create_model_and_transforms("fastclip-micro")
    model.load_state_dict(torch.load(checkpoint, map_location="cpu")["state_dict"])
    return model.eval(), open_clip.get_tokenizer("fastclip-micro"), preprocess


@pytest.mark.slow  # about 40 s: a 150-step training run
def test_trained_checkpoint_scores_equal_open_clip_direct(trained, digits_root, tmp_path, capsys):
    root = digits_root / "eval"
    assert eval_main(["--checkpoint", str(trained), "--data", str(root)]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    during_training = json.loads((trained.parent / "run" / "eval.json").read_text())

    model, tokenizer, preprocess = _direct_open_clip(trained)
    want = zeroshot_reference(model, tokenizer, preprocess, root)
    # few near-ties: the bounds pin the metrics (how many scores fall within 1e-4 of each other depends on the
    # trained weights, which differ by float rounding between CPUs, so the width is bounded loosely)
    assert all(hi - lo < 0.05 for lo, hi in want.values()), want
    assert within(ours, want), (ours, want)
    # the trainer's own eval at the end of training (eval.json may also name the split)
    assert within({key: during_training[key] for key in want}, want), (during_training, want)
    assert want["n"] == (397, 397)
    # trained (top-1 0.47 measured): well above chance 0.1, and on most classes (mean per-class recall), not one
    assert want["top1"][0] > 0.3 and want["mean_per_class_recall"][0] > 0.3

    ret = write_retrieval_split(root, tmp_path / "ret")
    assert eval_main(["--checkpoint", str(trained), "--data", str(ret)]) == 0
    ours_ret = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = retrieval_reference(model, tokenizer, preprocess, ret)
    assert within(ours_ret, want), (ours_ret, want)
    assert all(hi - lo < 0.05 for lo, hi in want.values()), want
    # the demo's captions repeat within a class (ties count in the query's favour), so image->text R@1 is class-level
    assert ours_ret["i2t_r1"] > 0.2 and ours_ret["t2i_r10"] > 2 * 10 / 397  # above chance for a trained model
