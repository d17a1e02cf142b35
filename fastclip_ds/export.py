"""Export a DeepSpeed run directory to an open_clip checkpoint: ``fastclip-ds export RUN_DIR --out model.pt``.

Writes ``model.pt`` (``{"state_dict", "epoch", "global_step", "name"}``, fp32, tensors and plain types only,
so ``torch.load(weights_only=True)`` reads it) and ``model.json`` beside it (the open_clip model config).
Any ZeRO stage (0-3) and fp32 or bf16 training is accepted. At ZeRO 1-3 the fp32 master weights are exported;
at ZeRO 0 the module's weights (for bf16 runs: the bf16 weights the model ran with, widened to fp32), because
DeepSpeed saves ZeRO-0 master copies without parameter names.

Load the result with open_clip alone (the JSON's file stem becomes the model name)::

    open_clip.add_model_config("model.json")
    model, _, preprocess = open_clip.create_model_and_transforms("model", pretrained="model.pt")

Tools that load through that call (CLIP_benchmark's ``--model model --pretrained model.pt``) need the JSON
registered in their process: call ``add_model_config`` first, or copy ``model.json`` into open_clip's
``model_configs/`` directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastclip_ds import checkpoint
from fastclip_ds.model import open_clip_with_configs, run_model, to_open_clip_state_dict

LOAD_HELP = (
    "load with open_clip: open_clip.add_model_config('{json}'); "
    "open_clip.create_model_and_transforms('{name}', pretrained='{pt}') (the JSON's file stem is the model name)"
)


def consolidate(ckpt_dir: Path, tag: str = checkpoint.LATEST) -> tuple[dict, dict]:
    """fp32 state dict and DeepSpeed model-state metadata (client state included) of the complete checkpoint
    ``tag`` (or the newest, ``latest``) in ``ckpt_dir``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = checkpoint.resolve(ckpt_dir, tag, option="--tag")
    tag_dir = ckpt_dir / tag
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"no DeepSpeed model states (*model_states.pt) in {tag_dir}")
    states = torch.load(model_files[0], map_location="cpu", weights_only=False)
    if any(tag_dir.glob("*_optim_states.pt")):  # ZeRO 1-3: fp32 master partitions live in the optimizer shards
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO 0: the module itself (its fp32 master copies, if any, are saved without parameter names)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    meta = {k: v for k, v in states.items() if k not in ("module", "optimizer")}
    return sd, meta


def export_checkpoint(run_dir: Path, out: Path, tag: str = checkpoint.LATEST) -> Path:
    """Write ``out`` (open_clip checkpoint) and ``out.with_suffix('.json')`` (model config); returns ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix == ".json":
        raise ValueError(f"--out {out}: the model config is written to <out>.json, so --out must not end in .json")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no config.json")
    try:  # the model as trained: model.force_quick_gelu / model.image_size included
        name, model_config, overrides = run_model(json.loads(config_path.read_text())["model"])
    except (KeyError, TypeError):
        raise ValueError(f"{config_path}: missing key model.config (the model spec)") from None
    sd, meta = consolidate(run_dir / "checkpoints", tag)
    sd = to_open_clip_state_dict(sd)
    # check against open_clip's own layout here rather than at load time
    expected = {k: v.shape for k, v in open_clip_with_configs().create_model(name, **overrides).state_dict().items()}
    wrong = sorted(k for k in expected.keys() | sd.keys() if k not in sd or expected.get(k) != sd[k].shape)
    if wrong:
        raise ValueError(f"checkpoint does not match open_clip model {name!r} at {len(wrong)} key(s), e.g. {wrong[:3]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    epoch = (meta.get("position") or {}).get("epoch")  # the train loop's client state: {"position": {...}}
    torch.save(
        {
            "state_dict": {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in sd.items()},
            "epoch": int(epoch) if epoch is not None else None,
            "global_step": int(meta.get("global_steps", 0)),
            "name": name,
        },
        out,
    )
    out.with_suffix(".json").write_text(json.dumps(model_config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastclip-ds export",
        description="Consolidate a DeepSpeed run's checkpoint (any ZeRO stage) into an fp32 open_clip checkpoint "
        "OUT plus its model config OUT with suffix .json.",
        epilog=LOAD_HELP.format(json="model.json", name="model", pt="model.pt"),
    )
    parser.add_argument("run_dir", type=Path, help="run directory (holds config.json and checkpoints/)")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint, e.g. model.pt")
    parser.add_argument(
        "--tag",
        default=checkpoint.LATEST,
        help="checkpoint tag under RUN_DIR/checkpoints, e.g. step00000100 (default: latest, the newest complete one)",
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.run_dir, args.out, args.tag)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"fastclip-ds export: error: {err}\n")
    config = out.with_suffix(".json")
    print(f"wrote {out} and {config}; " + LOAD_HELP.format(json=config, name=out.stem, pt=out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
