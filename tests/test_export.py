"""Export round trip: real DeepSpeed engines (ZeRO 0/2/3, fp32/bf16) -> export -> open_clip loads the result."""

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pytest
import torch

from fastclip_ds.checkpoint import COMPLETE, save, tag_for
from fastclip_ds.export import export_checkpoint, main
from fastclip_ds.losses.base import ContrastiveLoss
from fastclip_ds.model import create_model, open_clip_with_configs
from fastclip_ds.multiproc import free_port

RUNS = [(0, "fp32"), (0, "bf16"), (2, "fp32"), (2, "bf16"), (3, "bf16")]
MODEL = "fastclip-micro"
TAG = tag_for(1)


def _probe_inputs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return images, tokenizer(["zero", "a photo of the number: 1.", "two", "three"])


def _train_and_save(root: str, port: int) -> None:
    """Child process: one optimizer step per (stage, dtype), save as training does, record the engine's features."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    from fastclip_ds.ds_compat import patch_deepspeed

    patch_deepspeed()
    open_clip = open_clip_with_configs()
    for stage, dtype in RUNS:
        bundle = create_model(MODEL, seed=0)
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": dtype == "bf16"},
        }
        engine, *_ = deepspeed.initialize(model=bundle.model, model_parameters=bundle.model.parameters(), config=config)
        images, tokens = _probe_inputs(bundle.tokenizer)
        images = images.to(next(engine.module.parameters()).dtype)
        out = engine(images, tokens)
        loss = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
        engine.backward(loss)
        engine.step()
        run_dir = f"{root}/run-{stage}-{dtype}"
        ckpt_dir = Path(run_dir) / "checkpoints"
        save(engine, ContrastiveLoss(), ckpt_dir, 1, {"position": {"epoch": 2}}, keep=0)
        engine.eval()
        with torch.no_grad():
            out = engine(images, tokens)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # no-op below ZeRO 3
            weights = {k: v.float().clone() for k, v in engine.module.state_dict().items()}
        torch.save({"weights": weights} | {k: v.float() for k, v in out.items()}, f"{run_dir}/engine.pt")
        with open(f"{run_dir}/config.json", "w") as f:
            json.dump({"model": {"config": MODEL}}, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ds-runs")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    child = mp.get_context("spawn").Process(target=_train_and_save, args=(str(root), free_port()))
    child.start()
    child.join(timeout=240)
    if child.is_alive():
        child.kill()
        pytest.fail("DeepSpeed child process timed out")
    assert child.exitcode == 0, f"DeepSpeed child process failed (exit code {child.exitcode})"
    return str(root)


@pytest.mark.parametrize(("stage", "dtype"), RUNS)
def test_export_loads_in_open_clip_and_matches_engine(runs, tmp_path, stage, dtype):
    run_dir = f"{runs}/run-{stage}-{dtype}"
    out = export_checkpoint(run_dir, tmp_path / f"export-{stage}-{dtype}.pt")
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 1 and checkpoint["name"] == MODEL
    assert all(v.dtype == torch.float32 for v in checkpoint["state_dict"].values())
    assert checkpoint["state_dict"]["logit_scale"].shape == ()

    open_clip = open_clip_with_configs()
    open_clip.add_model_config(out.with_suffix(".json"))
    model, _, _ = open_clip.create_model_and_transforms(out.stem, pretrained=str(out))
    assert model.logit_scale.shape == ()  # plain open_clip, not our [1] variant
    # in the run's dtype the export equals the engine's weights exactly: bf16 masters round to the bf16 module
    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    engine = torch.load(f"{run_dir}/engine.pt", weights_only=True)
    ours = {k: v.float() for k, v in model.state_dict().items()}
    assert ours.keys() == engine["weights"].keys()
    assert all(torch.equal(ours[k].flatten(), v.flatten()) for k, v in engine["weights"].items())
    images, tokens = _probe_inputs(open_clip.get_tokenizer(out.stem))
    with torch.no_grad():
        image_features = model.encode_image(images.to(model.logit_scale.dtype), normalize=True).float()
        text_features = model.encode_text(tokens, normalize=True).float()
    # ZeRO 3 runs its own linear autograd function, which rounds differently in bf16 (about 1 ulp)
    atol = 1e-2 if (stage, dtype) == (3, "bf16") else 1e-6
    torch.testing.assert_close(image_features, engine["image_features"], rtol=0, atol=atol)
    torch.testing.assert_close(text_features, engine["text_features"], rtol=0, atol=atol)
    torch.testing.assert_close(model.logit_scale.exp().float().reshape(1), engine["logit_scale"], rtol=0, atol=0)
    # one optimizer step moved the weights away from the seeded initialisation
    initial = create_model(MODEL, seed=0).model.state_dict()
    assert not torch.equal(checkpoint["state_dict"]["visual.conv1.weight"], initial["visual.conv1.weight"])


def test_cli_and_errors(runs, tmp_path, capsys):
    out = tmp_path / "cli" / "digits-micro.pt"
    assert main([f"{runs}/run-2-fp32", "--out", str(out), "--tag", TAG]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["embed_dim"] == 16
    assert "add_model_config" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([f"{runs}/run-2-fp32", "--out", str(tmp_path / "x.pt"), "--tag", "nope"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"fastclip-ds export: error: --tag nope: {runs}/run-2-fp32/checkpoints/nope does not exist\n"
    )
    with pytest.raises(ValueError, match=r"must not end in \.json"):
        export_checkpoint(f"{runs}/run-2-fp32", tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        export_checkpoint(tmp_path, tmp_path / "x.pt")


def test_mismatched_model_is_rejected(runs, tmp_path):
    run_dir = tmp_path / "wrong-model"
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(f"{runs}/run-0-fp32/checkpoints")
    (run_dir / "config.json").write_text(json.dumps({"model": {"config": "fastclip-tiny"}}))
    with pytest.raises(ValueError, match="does not match open_clip model 'fastclip-tiny'"):
        export_checkpoint(run_dir, tmp_path / "x.pt")


def _copy_run(runs: str, dst: Path, drop: str) -> Path:
    """A copy of the ZeRO-2 run whose checkpoint lacks the files matching ``drop``."""
    shutil.copytree(f"{runs}/run-2-fp32", dst, ignore=shutil.ignore_patterns("engine.pt"))
    for path in (dst / "checkpoints" / TAG).glob(drop):
        path.unlink()
    return dst


def test_incomplete_tag_is_a_one_line_error(runs, tmp_path, capsys):
    """A save cut off before complete.json (DeepSpeed's files all written) must not be exported, asked for by
    --tag or reached through latest: the old --tag path skipped the check and exported it."""
    run_dir = _copy_run(runs, tmp_path / "cut", COMPLETE)
    ckpt_dir = run_dir / "checkpoints"
    for argv in (["--tag", TAG], []):
        with pytest.raises(SystemExit) as exit_info:
            main([str(run_dir), "--out", str(tmp_path / "x.pt"), *argv])
        assert exit_info.value.code == 2
        spec = argv[-1] if argv else "latest"
        assert capsys.readouterr().err == (
            f"fastclip-ds export: error: --tag {spec}: {ckpt_dir / TAG} is incomplete "
            f"(no {COMPLETE}: a save was cut off)\n"
        )
    (ckpt_dir / "latest").unlink()
    with pytest.raises(FileNotFoundError, match=r"^--tag latest: no checkpoint in .* \(no 'latest' file\)$"):
        export_checkpoint(run_dir, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_complete_tag_without_model_states_is_rejected(runs, tmp_path):
    run_dir = _copy_run(runs, tmp_path / "no-model", "*model_states.pt")
    with pytest.raises(FileNotFoundError, match=r"no DeepSpeed model states \(\*model_states\.pt\) in "):
        export_checkpoint(run_dir, tmp_path / "x.pt")
