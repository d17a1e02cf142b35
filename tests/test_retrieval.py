"""Retrieval metrics (hand-computed), the shard pipeline vs a per-sample float64 reference, ``evaluate``'s dispatch,
the captions writer, and a briefly trained exported checkpoint scored by our eval vs open_clip loaded directly."""

import json
import os
import socket
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


def write_retrieval(root: Path, captions: list[list[str]]) -> Path:
    """A retrieval split of distinct 32x32 images (a gradient shifted per image), two shards."""
    (root / "test").mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    (root / "test" / "nshards.txt").write_text("2\n")
    half = (len(captions) + 1) // 2
    for shard in range(2):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as sink:
            for i in range(shard * half, min(len(captions), (shard + 1) * half)):
                img = Image.new("RGB", (32, 32))
                img.putdata(
                    [((x * 8 + i * 40) % 256, (y * 8) % 256, (i * 70) % 256) for y in range(32) for x in range(32)]
                )
                sink.write({"__key__": f"{i:04d}", "jpg": img, "txt": "\n".join(captions[i])})
    return root


def reference_recall(model, tokenizer, transform, root: Path, ks=(1, 5, 10)) -> dict[str, float]:
    """One sample at a time, float64 cosines, ranks by counting: the definition, independent of the pipeline."""
    images, texts, owner = [], [], []
    for shard in sorted((root / "test").glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False).decode("pil"):
            with torch.no_grad():
                image = sample["jpg"] if "jpg" in sample else sample["png"]
                images.append(model.encode_image(transform(image)[None])[0].double())
                for caption in sample["txt"].splitlines():
                    texts.append(model.encode_text(tokenizer([caption]))[0].double())
                    owner.append(len(images) - 1)
    img = torch.nn.functional.normalize(torch.stack(images), dim=-1)
    txt = torch.nn.functional.normalize(torch.stack(texts), dim=-1)
    s = (txt @ img.T).tolist()
    out = {}
    for k in ks:
        t2i = [sum(v > row[owner[t]] for v in row) < k for t, row in enumerate(s)]
        i2t = []
        for i in range(len(images)):
            best = max(s[t][i] for t in range(len(texts)) if owner[t] == i)
            i2t.append(sum(s[t][i] > best for t in range(len(texts))) < k)
        out[f"i2t_r{k}"], out[f"t2i_r{k}"] = sum(i2t) / len(i2t), sum(t2i) / len(t2i)
    return out | {"n_images": len(images), "n_texts": len(texts)}


def test_retrieval_eval_matches_per_sample_reference(tmp_path):
    captions = [[f"a photo number {i}", f"picture {i}"] for i in range(7)] + [["one caption only"]] * 5
    root = write_retrieval(tmp_path / "ret", captions)
    bundle = create_model("fastclip-micro", seed=3)
    got = retrieval_eval(bundle.model, bundle.tokenizer, bundle.eval_transform, root, batch_size=5)
    want = reference_recall(bundle.model, bundle.tokenizer, bundle.eval_transform, root)
    assert got == pytest.approx(want, abs=1e-12)
    assert got["n_images"] == 12 and got["n_texts"] == 19
    assert evaluate(bundle.model, bundle.tokenizer, bundle.eval_transform, root, batch_size=64) == got


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                        "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
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
    assert during_training == pytest.approx(ours, abs=1e-12)

    model, tokenizer, preprocess = _direct_open_clip(trained)
    classnames = (root / "classnames.txt").read_text().split()
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    with torch.no_grad():
        weights = []
        for c in classnames:
            e = model.encode_text(tokenizer([t.format(c=c) for t in templates])).double()
            weights.append(torch.nn.functional.normalize(torch.nn.functional.normalize(e, dim=-1).mean(0), dim=0))
        classifier = torch.stack(weights, dim=1)
        preds, labels = [], []
        for url in sorted((root / "test").glob("*.tar")):
            for s in wds.WebDataset(str(url), shardshuffle=False, empty_check=False).decode("pil"):
                f = model.encode_image(preprocess(s["png"])[None]).double()
                preds.append(int((f @ classifier).argmax()))
                labels.append(int(s["cls"]))
    top1 = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
    assert ours["top1"] == pytest.approx(top1, abs=1e-12)
    assert top1 > 0.3 and len(set(preds)) >= 5  # trained (0.47 measured): well above chance 0.1, not one class

    ret = write_retrieval_split(root, tmp_path / "ret")
    assert eval_main(["--checkpoint", str(trained), "--data", str(ret)]) == 0
    ours_ret = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours_ret == pytest.approx(reference_recall(model, tokenizer, preprocess, ret), abs=1e-12)
    # the demo's captions repeat within a class (ties count in the query's favour), so image->text R@1 is class-level
    assert ours_ret["i2t_r1"] > 0.2 and ours_ret["t2i_r10"] > 2 * 10 / 397  # above chance for a trained model
