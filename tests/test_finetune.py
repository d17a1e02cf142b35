"""Starting weights: ``model.pretrained`` (a local checkpoint file) and ``train.init_from`` (another run), through
real DeepSpeed engines, ``fastclip-ds export`` and open_clip's own loader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastclip_ds import digits, train
from fastclip_ds.eval import evaluate
from fastclip_ds.export import export_checkpoint
from fastclip_ds.model import create_model, open_clip_with_configs, read_checkpoint, to_open_clip_state_dict
from fastclip_ds.multiproc import spawn

REPO = Path(__file__).parents[1]
EVAL_BATCH = 64


def run_args(root: Path, out: Path, steps: int, *sets: str) -> list[str]:
    """``--set`` pairs of a short fastclip-micro run on the digits shards."""
    pairs = [
        f"data.train={digits.train_pattern(root)}",
        f"eval.data={digits.eval_root(root)}",
        f"eval.batch_size={EVAL_BATCH}",
        "model.config=fastclip-micro",
        "train.global_batch_size=32",
        f"train.max_steps={steps}",
        "train.warmup_steps=3",
        "train.lr=2e-3",
        "loss.name=openclip",
        f"train.output_dir={out}",
        *sets,
    ]
    return [x for pair in pairs for x in ("--set", pair)]


@pytest.fixture(scope="module")
def exported(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A 20-step digits run (fastclip-micro, OpenCLIP loss, ZeRO-2 fp32), its export, and the export's own
    evaluation: open_clip loads it as the export's docstring says, and the project's eval code scores it at batch
    size 64."""
    tmp = tmp_path_factory.mktemp("finetune")
    run_dir = tmp / "run_a"
    cmd = [sys.executable, "-m", "fastclip_ds.train", *run_args(digits_root, run_dir, 20, "eval.data=null")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pt = export_checkpoint(run_dir, tmp / "digits_export.pt")
    open_clip = open_clip_with_configs()
    open_clip.add_model_config(pt.with_suffix(".json"))
    model, _, preprocess = open_clip.create_model_and_transforms("digits_export", pretrained=str(pt))
    own = evaluate(
        model.eval(), open_clip.get_tokenizer("digits_export"), preprocess, digits.eval_root(digits_root), EVAL_BATCH
    )
    return run_dir, pt, own


def finetune_worker(rank: int, world: int, root: str, out: str, sets: list[str], steps: int) -> dict:
    """A Trainer (real engine, default ZeRO-2 fp32) started from ``sets``' weights: its evaluation before any step,
    and after ``steps`` steps (the run's end) if ``steps``."""
    from fastclip_ds.config import load_config, validate
    from fastclip_ds.engine import build_ds_config, default_ds_config

    cfg = load_config(None, [*run_args(Path(root), Path(out), max(steps, 4), *sets)[1::2], "data.num_workers=0"])
    validate(cfg, world)
    ds_config = build_ds_config(default_ds_config(False), "<default>", global_batch=32, world_size=world, on_cuda=False)
    with train.Trainer(cfg, ds_config, Path(out), rank, world) as trainer:
        result = {"step0": trainer.evaluate(), "position": vars(trainer.pos).copy()}
        if steps:
            result["end"] = trainer.run()
        return result


def scores(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


@pytest.mark.slow
def test_finetune_from_export_starts_at_its_evaluation_and_improves(
    exported: tuple[Path, Path, dict], digits_root: Path, tmp_path: Path
) -> None:
    """A run with ``model.pretrained=<export>``: its step-0 evaluation equals the export's own evaluation (open_clip's
    loader, same eval code and batch size) to 1e-6, and 40 further steps raise zero-shot top-1 and mean per-class
    recall. Catches weights not loaded (random init scores near 0.1), loaded before the engine copied the module
    (ZeRO would keep the random ones), a wrong scalar layout for logit_scale, or a start that training cannot use."""
    _, pt, own = exported
    sets = [f"model.pretrained={pt}", "train.lr=1e-3"]  # a fresh optimizer: a lower peak lr than run A's
    (r,) = spawn(1, finetune_worker, (str(digits_root), str(tmp_path), sets, 40), timeout=600)
    step0, end = scores(r["step0"]), scores(r["end"])
    assert step0.keys() == scores(own).keys() == end.keys() and step0
    for key, value in own.items():
        if isinstance(value, float):
            assert step0[key] == pytest.approx(value, abs=1e-6), (key, step0, own)
    assert end["top1"] > step0["top1"] and end["mean_per_class_recall"] > step0["mean_per_class_recall"], (step0, end)
    print(f"finetune from a 20-step export: step 0 {step0}, after 40 steps {end}")


def test_init_from_a_run_starts_from_its_weights_without_its_position(
    exported: tuple[Path, Path, dict], digits_root: Path, tmp_path: Path
) -> None:
    """``train.init_from=<run dir>`` loads the run's latest complete checkpoint (through the ZeRO-2 consolidation),
    evaluates like the export of that run, and starts at step 0. Catches the run's position or optimizer carried over
    (a new run would resume at step 4) or the weights not loaded."""
    run_dir, _, own = exported
    (r,) = spawn(1, finetune_worker, (str(digits_root), str(tmp_path), [f"train.init_from={run_dir}"], 0), timeout=300)
    assert r["position"] == {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    for key, value in scores(own).items():
        assert r["step0"][key] == pytest.approx(value, abs=1e-6), (key, r["step0"], own)


def test_checkpoint_formats_read_to_the_same_weights(tmp_path: Path) -> None:
    """An export (``{"state_dict"}``), open_clip_train's ``epoch_*.pt`` (``module.`` prefixes, optimizer beside) and
    open_clip's ``.bin`` / ``.safetensors`` (bare open_clip state dicts) all read to the model's own tensors, with
    ``logit_scale`` in the ``[1]`` layout. Catches a prefix left on, the wrong entry taken, a scalar-layout slip."""
    from safetensors.torch import save_file

    model = create_model("fastclip-micro", seed=0).model
    own = model.state_dict()
    oc = to_open_clip_state_dict(own)
    torch.save({"state_dict": oc, "epoch": 1, "global_step": 4, "name": "fastclip-micro"}, tmp_path / "export.pt")
    optimizer = torch.optim.AdamW(model.parameters())
    module = {f"module.{k}": v for k, v in oc.items()}
    torch.save({"epoch": 2, "name": "x", "state_dict": module, "optimizer": optimizer.state_dict()}, tmp_path / "e.pt")
    torch.save(oc, tmp_path / "open_clip_pytorch_model.bin")
    save_file({k: v.contiguous() for k, v in oc.items()}, tmp_path / "open_clip_model.safetensors")
    for name in ("export.pt", "e.pt", "open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        sd = read_checkpoint(tmp_path / name)
        assert sd.keys() == own.keys(), name
        assert all(torch.equal(sd[k], own[k]) for k in own), name


def config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *sets: str) -> str:
    """``train.main`` on world size 1 must exit 2 before any process group; its one-line stderr."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    args = ["--set", "model.config=fastclip-micro", "--set", f"train.output_dir={tmp_path / 'run'}"]
    assert train.main([*args, *(x for s in sets for x in ("--set", s))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_mismatched_checkpoint_is_a_one_line_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A fastclip-tiny checkpoint for a fastclip-micro run, a micro one with one wrong shape, a missing file, a file
    that is no checkpoint, an ``init_from`` without checkpoints, and both starting-weight keys: each a one-line config
    error naming the key (and for the mismatch the first keys), exit 2 before any process group. Catches a traceback
    from ``load_state_dict`` after minutes of startup, or a silent non-strict load."""
    tiny = tmp_path / "tiny.pt"
    torch.save({"state_dict": to_open_clip_state_dict(create_model("fastclip-tiny", seed=0).model.state_dict())}, tiny)
    line = config_error(tmp_path, monkeypatch, capsys, f"model.pretrained={tiny}")
    assert line.startswith(f"config error: --set: model.pretrained: {tiny} does not fit the model: ")
    assert "mismatch(es): " in line and "unexpected visual.transformer.resblocks.1." in line  # tiny has 2 layers
    micro = to_open_clip_state_dict(create_model("fastclip-micro", seed=0).model.state_dict())
    torch.save({**micro, "visual.proj": torch.zeros(32, 8)}, tmp_path / "proj.bin")
    line = config_error(tmp_path, monkeypatch, capsys, f"model.pretrained={tmp_path / 'proj.bin'}")
    assert line.endswith("does not fit the model: 1 mismatch(es): visual.proj is [32, 8], model has [32, 16]")
    missing = tmp_path / "none.pt"
    line = config_error(tmp_path, monkeypatch, capsys, f"model.pretrained={missing}")
    assert line == f"config error: --set: model.pretrained: checkpoint file not found: {missing}"
    (tmp_path / "junk.bin").write_text("not a checkpoint")
    line = config_error(tmp_path, monkeypatch, capsys, f"model.pretrained={tmp_path / 'junk.bin'}")
    assert line.startswith(f"config error: --set: model.pretrained: {tmp_path / 'junk.bin'}: not a readable checkpoint")
    line = config_error(tmp_path, monkeypatch, capsys, f"train.init_from={tmp_path}")
    assert line.startswith("config error: --set: train.init_from: ")
    line = config_error(tmp_path, monkeypatch, capsys, f"model.pretrained={tiny}", f"train.init_from={tmp_path}")
    assert line == "config error: --set: train.init_from: set either model.pretrained or train.init_from, not both"
