"""The sklearn-digits writer: layout, keys, captions, real images, determinism, atomic/concurrent creation."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits

from fastclip_ds import digits
from fastclip_ds.data import expand_urls


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _train_samples(root: Path) -> list[dict]:
    out = []
    for url in expand_urls(digits.train_pattern(root)):
        files = _members(Path(url))
        for name in sorted(n for n in files if n.endswith(".json")):
            stem = name[: -len(".json")]
            meta = json.loads(files[name])
            out.append({"stem": stem, **meta, "txt": files[f"{stem}.txt"].decode(), "png": files[f"{stem}.png"]})
    return out


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _nearest_centroid_accuracy(pngs: list[bytes], labels: list[int]) -> float:
    """Downscale each image back to 8x8 and classify it by the closest sklearn class mean."""
    d = load_digits()
    centroids = np.stack([d.images[d.target == c].mean(0).ravel() for c in range(10)])
    hits = 0
    for png, label in zip(pngs, labels, strict=True):
        img = Image.open(io.BytesIO(png)).convert("L").resize((8, 8), Image.Resampling.BOX)
        x = np.asarray(img, dtype=np.float64).ravel() * 16.0 / 255.0
        hits += int(np.argmin(((centroids - x) ** 2).sum(1)) == label)
    return hits / len(labels)


def test_train_shards_img2dataset_layout(digits_root: Path) -> None:
    shards = expand_urls(digits.train_pattern(digits_root))
    assert [Path(s).name for s in shards] == [f"{i:06d}.tar" for i in range(14)]
    sizes = json.loads((digits_root / "train" / "sizes.json").read_text())
    assert sizes == {f"{i:06d}.tar": 100 for i in range(14)}
    for shard in shards:
        names = sorted(_members(Path(shard)))
        stems = sorted({n.split(".")[0] for n in names})
        assert names == sorted(f"{s}.{e}" for s in stems for e in ("png", "txt", "json"))

    samples = _train_samples(digits_root)
    assert len(samples) == digits.NUM_TRAIN
    assert sorted(s["key"] for s in samples) == list(range(digits.NUM_TRAIN))
    assert all(s["stem"] == f"{s['key']:06d}" for s in samples)
    assert Counter(s["label"] for s in samples).keys() == set(range(10))


def test_train_captions(digits_root: Path) -> None:
    samples = _train_samples(digits_root)
    forms = Counter()
    for s in samples:
        assert s["caption"] == s["txt"]
        word, numeral = digits.CLASS_WORDS[s["label"]], digits.CLASSNAMES[s["label"]]
        candidates = {t.format(c=c) for t in digits.TRAIN_TEMPLATES for c in (word, numeral)}
        assert s["txt"] in candidates
        forms["word" if word in s["txt"] else "numeral"] += 1
        forms.update(t for t in digits.TRAIN_TEMPLATES if s["txt"] in (t.format(c=word), t.format(c=numeral)))
    assert 0.4 < forms["word"] / len(samples) < 0.6  # both name forms, about half each
    assert all(forms[t] > 200 for t in digits.TRAIN_TEMPLATES)  # every template used


def test_eval_split_clip_benchmark_layout(digits_root: Path) -> None:
    ev = digits.eval_root(digits_root)
    assert (ev / "classnames.txt").read_text().splitlines() == list(digits.CLASSNAMES)
    templates = (ev / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == list(digits.EVAL_TEMPLATES) and all("{c}" in t for t in templates)
    assert not set(templates) & set(digits.TRAIN_TEMPLATES)
    assert (ev / "dataset_type.txt").read_text().strip() == "classification"
    nshards = int((ev / "test" / "nshards.txt").read_text())
    assert nshards == 4

    # Read it the way CLIP_benchmark's build_wds_dataset does.
    urls = str(ev / "test" / f"{{0..{nshards - 1}}}.tar")
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("webp;png;jpg;jpeg", "cls")
    items = list(ds)
    assert len(items) == digits.NUM_TEST
    labels = [label for _, label in items]
    assert all(isinstance(label, int) for label in labels)
    # Stratified: each class's test share matches its share in the full data to within one sample.
    full = Counter(load_digits().target.tolist())
    for c, n in Counter(labels).items():
        assert abs(n - full[c] * digits.NUM_TEST / sum(full.values())) <= 1
    assert {img.size for img, _ in items} == {(32, 32)}


def test_images_are_the_labelled_digits(digits_root: Path) -> None:
    samples = _train_samples(digits_root)[:400]
    img = Image.open(io.BytesIO(samples[0]["png"]))
    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32))
    pixels = np.asarray(img)
    assert pixels.min() < 20 and pixels.max() > 200  # white digit on black
    assert _nearest_centroid_accuracy([s["png"] for s in samples], [s["label"] for s in samples]) > 0.85


def test_deterministic_bytes_and_seed_dependence(digits_root: Path, tmp_path: Path) -> None:
    again = digits.write_digits(tmp_path / "again")
    assert _tree_digest(again) == _tree_digest(digits_root)
    other = digits.write_digits(tmp_path / "other", seed=1)
    assert _tree_digest(other)["train/000000.tar"] != _tree_digest(digits_root)["train/000000.tar"]


def test_cli_options_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small"
    assert digits.main([str(out), "--size", "16", "--shard-size", "500", "--seed", "3"]) == 0
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    assert (out / "eval" / "test" / "nshards.txt").read_text().strip() == "1"
    png = next(v for k, v in _members(out / "train" / "000002.tar").items() if k.endswith(".png"))
    assert Image.open(io.BytesIO(png)).size == (16, 16)
    assert str(out) in capsys.readouterr().out

    assert digits.main([str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert digits.main([str(tmp_path / "x"), "--size", "4"]) == 2
    assert "--size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        digits.main(["--help"])
    help_text = capsys.readouterr().out
    assert all(opt in help_text for opt in ("OUT_DIR", "--size", "--seed", "--shard-size"))


def test_crash_leaves_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out: Path, *args: int) -> None:
        (out / "train").mkdir(parents=True)
        (out / "train" / "000000.tar").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "_write_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        digits.ensure_digits(tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock"]


def _ensure_in_child(root: str, queue: mp.Queue) -> None:
    queue.put(str(digits.ensure_digits(root)))


def test_ensure_digits_concurrent_and_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "shared"
    stale = tmp_path / ".shared.tmp-999999"  # left by a crashed writer
    stale.mkdir()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(str(root), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(queue.get(timeout=5) for _ in procs) == [str(root)] * 3
    assert not stale.exists()
    assert sum(json.loads((root / "train" / "sizes.json").read_text()).values()) == digits.NUM_TRAIN
    before = _tree_digest(root)
    assert digits.ensure_digits(root) == root and _tree_digest(root) == before

    monkeypatch.setenv("FASTCLIP_DATA", str(root))
    assert digits.default_root() == root and digits.ensure_digits() == root
