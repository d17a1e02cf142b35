"""Model specs, shipped tiny configs, [1]-shaped scalars and state-dict conversion."""

import json
import math

import pytest
import torch
from PIL import Image

from fastclip_ds.model import (
    CONFIG_DIR,
    create_model,
    from_open_clip_state_dict,
    open_clip_with_configs,
    resolve_model_config,
    to_open_clip_state_dict,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "low", "high", "size", "context"),
    [("fastclip-tiny", 7.5e6, 8.0e6, 32, 20), ("fastclip-micro", 0.5e6, 1.0e6, 16, 20)],
)
def test_shipped_configs(name, low, high, size, context):
    bundle = create_model(name, seed=0)
    assert low < n_params(bundle.model) < high
    assert bundle.name == name
    assert bundle.config == json.loads((CONFIG_DIR / f"{name}.json").read_text())
    assert bundle.tokenizer(["a photo of the number: 7."]).shape == (1, context)
    assert bundle.eval_transform(Image.new("RGB", (8, 8))).shape == (3, size, size)
    assert bundle.train_transform(Image.new("RGB", (8, 8))).shape == (3, size, size)


def test_every_param_is_at_least_1d_and_forward_normalises():
    bundle = create_model("fastclip-micro", init_temperature=0.05, seed=1)
    assert all(p.dim() > 0 for p in bundle.model.parameters())
    assert bundle.model.logit_scale.shape == (1,)
    out = bundle.model(torch.randn(3, 3, 16, 16), bundle.tokenizer(["zero", "one", "two"]))
    assert out["image_features"].shape == out["text_features"].shape == (3, 16)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].shape == (1,)
    torch.testing.assert_close(out["logit_scale"], torch.tensor([1 / 0.05]))


def test_open_clip_model_by_name_has_1d_logit_scale():
    bundle = create_model("RN50", seed=0)
    assert bundle.model.logit_scale.shape == (1,)
    assert math.isclose(bundle.model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert bundle.tokenizer.context_length == 77


def test_seed_reproducible_and_rng_untouched():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = create_model("fastclip-micro", seed=7).model.state_dict()
    b = create_model("fastclip-micro", seed=7).model.state_dict()
    c = create_model("fastclip-micro", seed=8).model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


def test_json_path_spec(tmp_path):
    config = json.loads((CONFIG_DIR / "fastclip-micro.json").read_text())
    config["text_cfg"]["context_length"] = 12
    path = tmp_path / "my-micro-ctx12.json"
    path.write_text(json.dumps(config))
    bundle = create_model(str(path), seed=0)
    assert bundle.name == "my-micro-ctx12"
    assert bundle.config == config
    assert bundle.tokenizer(["x"]).shape == (1, 12)
    assert bundle.model.positional_embedding.shape[0] == 12
    # registered with open_clip itself under the file stem
    assert open_clip_with_configs().get_model_config("my-micro-ctx12") == config


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        resolve_model_config("no-such-model")
    with pytest.raises(FileNotFoundError, match="model config file not found"):
        resolve_model_config(str(tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(ValueError, match="missing key"):
        resolve_model_config(str(bad))
    clash = tmp_path / "RN50.json"
    clash.write_text((CONFIG_DIR / "fastclip-micro.json").read_text())
    with pytest.raises(ValueError, match="already names a different model"):
        resolve_model_config(str(clash))
    with pytest.raises(ValueError, match="init_temperature must be > 0"):
        create_model("fastclip-micro", init_temperature=0.0)


def test_state_dict_round_trip_with_open_clip():
    open_clip = open_clip_with_configs()
    ours = create_model("fastclip-micro", seed=3).model
    exported = to_open_clip_state_dict(ours.state_dict())
    assert exported["logit_scale"].shape == ()
    reference = open_clip.create_model("fastclip-micro")  # plain open_clip: 0-dim logit_scale
    reference.load_state_dict(exported, strict=True)  # shapes must match exactly
    back = from_open_clip_state_dict(reference.state_dict())
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
