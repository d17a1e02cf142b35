"""Someone else's img2dataset shards + someone else's open_clip model-config JSON → train → export → open_clip."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastclip_ds import digits
from fastclip_ds.compat import import_open_clip
from fastclip_ds.eval.zeroshot import zeroshot_eval

from .test_train import run

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# An open_clip model config as a user would write it (same schema as open_clip's model_configs/*.json).
USER_MODEL_CONFIG = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 24, "layers": 3, "width": 96, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 96, "heads": 3, "layers": 2},
}


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_img2dataset_shards(out: Path, per_shard: int = 256) -> tuple[str, int]:
    """Digits as img2dataset writes them: ``{shard:05d}{i:04d}.jpg|.txt|.json``, json with key and caption."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    rng = np.random.default_rng(7)
    n = len(labels) - len(labels) % per_shard
    out.mkdir(parents=True)
    for shard in range(n // per_shard):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                idx = shard * per_shard + i
                key = f"{shard:05d}{i:04d}"
                pixels = (images[idx].reshape(8, 8) * 255 / 16).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).convert("RGB").resize((24, 24), Image.BICUBIC).save(buf, format="JPEG")
                caption = rng.choice(["an image of a {}", "{} written by hand", "handwriting: {}"]).format(
                    rng.choice([NAMES[labels[idx]], str(labels[idx])])
                )
                meta = {
                    "url": f"https://example.invalid/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "caption": caption,
                    "width": 24,
                    "height": 24,
                }
                _add(tar, f"{key}.jpg", buf.getvalue())
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
    return str(out / f"{{00000..{n // per_shard - 1:05d}}}.tar"), n


@pytest.mark.slow
def test_foreign_shards_and_model_config_train_export_and_load_in_open_clip(tmp_path: Path) -> None:
    pattern, n = write_img2dataset_shards(tmp_path / "shards")
    model_json = tmp_path / "my-clip.json"
    model_json.write_text(json.dumps(USER_MODEL_CONFIG))
    eval_root = digits.eval_root(digits.ensure_digits(tmp_path / "digits"))
    out = tmp_path / "run"
    proc = run(
        [
            sys.executable,
            "-m",
            "fastclip_ds.train",
            "--set",
            f"data.train={pattern}",
            "--set",
            f"data.num_samples={n}",
            "--set",
            "data.dataset_size=100000",
            "--set",
            f"model.config={model_json}",
            "--set",
            "train.global_batch_size=64",
            "--set",
            "train.epochs=6",
            "--set",
            "train.lr=2e-3",
            "--set",
            "train.warmup_steps=20",
            "--set",
            "eval.data=null",
            "--set",
            f"train.output_dir={out}",
        ]
    )
    assert proc.returncode == 0
    assert (
        run([sys.executable, "-m", "fastclip_ds.cli", "export", str(out), "--out", str(tmp_path / "m.pt")]).returncode
        == 0
    )

    open_clip = import_open_clip()
    open_clip.add_model_config(str(tmp_path / "m.json"))
    model, _, preprocess = open_clip.create_model_and_transforms("m", pretrained=str(tmp_path / "m.pt"))
    tokenizer = open_clip.get_tokenizer("m")
    scores = zeroshot_eval(model, tokenizer, preprocess, eval_root)
    assert scores["top1"] > 0.4, scores  # chance is 0.1
