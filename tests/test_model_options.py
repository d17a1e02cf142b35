"""open_clip's model and augmentation options through the run config: ``model.force_quick_gelu``,
``model.image_size`` and ``data.aug_cfg`` (built by :func:`fastclip_ds.model.build_model`, as the Trainer does)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip_ds.config import ConfigError, check_environment, load_config, validate
from fastclip_ds.model import build_model, open_clip_with_configs, run_model

MEAN, STD = open_clip_with_configs().OPENAI_DATASET_MEAN, open_clip_with_configs().OPENAI_DATASET_STD


def bundle(*sets: str):
    cfg = load_config(None, ["model.config=fastclip-micro", *sets])
    validate(cfg, 1)
    return build_model(cfg)


def test_force_quick_gelu_and_image_size() -> None:
    """``model.force_quick_gelu`` puts open_clip's QuickGELU in every MLP (default: nn.GELU); ``model.image_size=24``
    builds a 6×6 patch grid (37 position embeddings for the micro ViT's 4-px patches), eval images of 24×24 that the
    model encodes, and a model config that says both (what an export must write). Catches the overrides dropped on
    the way to open_clip, or transforms left at the config's 16 px."""
    oc = open_clip_with_configs()
    plain = bundle()
    assert {type(m) for m in plain.model.modules() if isinstance(m, torch.nn.GELU | oc.model.QuickGELU)} == {
        torch.nn.GELU
    }
    b = bundle("model.force_quick_gelu=true", "model.image_size=24")
    assert {type(m) for m in b.model.modules() if isinstance(m, torch.nn.GELU | oc.model.QuickGELU)} == {
        oc.model.QuickGELU
    }
    assert b.model.visual.positional_embedding.shape[0] == 1 + 6 * 6
    image = b.eval_transform(Image.new("RGB", (40, 30), (200, 10, 90)))
    assert image.shape == (3, 24, 24)
    assert b.model.encode_image(image[None]).shape == (1, 16)
    assert b.config["quick_gelu"] is True and b.config["vision_cfg"]["image_size"] == 24
    assert "quick_gelu" not in plain.config and plain.config["vision_cfg"]["image_size"] == 16


def colour_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))


def test_aug_cfg_reaches_the_train_transform() -> None:
    """``data.aug_cfg={"gray_scale_prob": 1, "scale": [1, 1]}``: every train image is grey (its un-normalised
    channels are equal); without it they are coloured. Catches the augmentation settings ignored."""
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    grey = bundle('data.aug_cfg={"gray_scale_prob": 1.0, "scale": [1.0, 1.0]}').train_transform
    plain = bundle().train_transform
    for seed in range(3):
        x = grey(colour_image(seed)) * std + mean
        assert torch.allclose(x[0], x[1], atol=1e-5) and torch.allclose(x[1], x[2], atol=1e-5)
        y = plain(colour_image(seed)) * std + mean
        assert (y[0] - y[1]).abs().max() > 0.1


def test_bad_aug_cfg_and_image_size_are_config_errors(tmp_path: Path) -> None:
    """An unknown ``data.aug_cfg`` key, a value open_clip rejects (colour-jitter probability without the 4 jitter
    values) and a non-positive ``model.image_size``: one-line config errors naming the key, before any process group.
    Catches an unknown key silently ignored or a traceback at the first train batch."""
    out = f"train.output_dir={tmp_path}"
    cases = {
        'data.aug_cfg={"scal": [0.5, 1.0]}': "--set: data.aug_cfg: unknown key 'scal' (open_clip's: scale, ratio,",
        'data.aug_cfg={"color_jitter_prob": 0.5}': "--set: data.aug_cfg: open_clip rejects it (AssertionError",
        "model.image_size=0": "--set: model.image_size: must be positive or null, got 0",
    }
    for setting, message in cases.items():
        with pytest.raises(ConfigError) as err:
            cfg = load_config(None, ["model.config=fastclip-micro", out, setting])
            validate(cfg, 1)
            check_environment(cfg)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_export_config_describes_the_overridden_model(tmp_path: Path) -> None:
    """What ``fastclip-ds export`` writes as ``model.json`` (:func:`run_model` of the run's model section): open_clip
    builds from it, with no overrides, a model of the trained one's structure (QuickGELU, 24-px grid) and the same
    state-dict shapes; a run config without the override keys (older runs) gives the plain model. Catches an export
    whose JSON silently loads GELU (wrong outputs) or the config's image size (shape mismatch)."""
    oc = open_clip_with_configs()
    trained = bundle("model.force_quick_gelu=true", "model.image_size=24").model
    name, config, overrides = run_model({"config": "fastclip-micro", "force_quick_gelu": True, "image_size": 24})
    assert name == "fastclip-micro" and overrides == {"force_quick_gelu": True, "force_image_size": 24}
    (tmp_path / "exported_micro.json").write_text(json.dumps(config))
    oc.add_model_config(tmp_path / "exported_micro.json")
    loaded = oc.create_model("exported_micro", nonscalar_logit_scale=True)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in trained.state_dict().items()}
    assert any(isinstance(m, oc.model.QuickGELU) for m in loaded.modules())
    assert run_model({"config": "fastclip-micro"})[1:] == (
        oc.get_model_config("fastclip-micro"),
        {"force_quick_gelu": False, "force_image_size": None},
    )
