"""Update parity with ``open_clip_train``: the same weights, the same batches, K optimizer steps of each trainer.

Run under torchrun (any number of ranks, gloo on CPU). Each rank builds our :class:`fastclip_ds.train.Trainer`
(real DeepSpeed engine, ``loss.name=openclip``, the run config given by ``--set``) and copies its initial weights
into a plain open_clip model, wrapped in DDP and trained by open_clip_train's own ``train_one_epoch`` with
open_clip_train's loss (``create_loss``: ``ClipLoss`` with ``--local-loss --gather-with-grad``), its
``cosine_lr`` schedule and its optimizer grouping (AdamW, no weight decay on gains, biases and ``logit_scale``).
Both trainers get the same K local batches (our data pipeline, augmentation off, so the images are identical)
and the same hyper-parameters (lr, warm-up, total steps, betas, eps, weight decay, clipping). Rank 0 writes a
JSON report: per parameter tensor the largest difference between the two trainers' weights, relative to the
tensor's largest update, and the same over all tensors::

    torchrun --nproc_per_node 2 launchers/update_parity.py --steps 5 --out parity.json \\
        --set model.config=fastclip-tiny --set train.global_batch_size=32

Equal updates mean the trainers differ only in what is random between runs: initial weights, data order and
augmentation draws. Dividing by the update (not the weight) keeps the measure honest: weights that hardly
moved cannot hide a wrong update.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import deepspeed
import torch

from fastclip_ds.config import load_config, validate
from fastclip_ds.ds_compat import patch_deepspeed
from fastclip_ds.engine import build_ds_config, default_ds_config
from fastclip_ds.model import open_clip_with_configs, to_open_clip_state_dict
from fastclip_ds.train import Trainer, distributed_env


def open_clip_train_args(cfg: Any, world: int, rank: int, clip: float) -> argparse.Namespace:
    """open_clip_train's parsed arguments for the same hyper-parameters as our run config."""
    from open_clip_train.params import parse_args

    train, opt = cfg["train"], cfg["optimizer"]
    args = parse_args([
        "--model", cfg["model"]["config"], "--batch-size", str(train["global_batch_size"] // world),
        "--lr", str(train["lr"]), "--warmup", str(train["warmup_steps"]), "--wd", str(opt["weight_decay"]),
        "--beta1", str(opt["betas"][0]), "--beta2", str(opt["betas"][1]), "--eps", str(opt["eps"]),
        "--precision", "fp32", "--grad-clip-norm", str(clip), "--local-loss", "--gather-with-grad",
        "--log-every-n-steps", "1000000",
    ])  # fmt: skip
    args.device, args.rank, args.local_rank, args.world_size, args.distributed = "cpu", rank, rank, world, True
    args.distill, args.wandb, args.tensorboard = False, False, False  # main() derives these from other flags
    return args


def open_clip_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW grouped as open_clip_train's ``main`` does (its rule, restated: it is not importable)."""

    def excluded(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    exclude = [p for n, p in named if excluded(n, p)]
    rest = [p for n, p in named if not excluded(n, p)]
    return torch.optim.AdamW(
        [{"params": exclude, "weight_decay": 0.0}, {"params": rest, "weight_decay": args.wd}],
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
    )


class _Batches(list):
    """A list of ``(images, tokens)`` with the attributes ``train_one_epoch`` reads from a DataLoader."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], global_batch: int) -> None:
        super().__init__(batches)
        self.num_batches, self.num_samples = len(batches), len(batches) * global_batch


def parity(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict:
    """Per tensor ``max|ours - theirs| / max|theirs - init|``, and the worst over all tensors."""
    rows = {}
    for name, w0 in init.items():
        update = (theirs[name] - w0).abs().max().item()
        gap = (ours[name] - theirs[name]).abs().max().item()
        rows[name] = {"max_update": update, "max_gap": gap, "gap_over_update": gap / update if update else None}
    ratios = [r["gap_over_update"] for r in rows.values() if r["gap_over_update"] is not None]
    return {"worst_gap_over_update": max(ratios), "tensors": len(rows), "moved": len(ratios), "per_tensor": rows}


def train_both(cfg: Any, world: int, rank: int, steps: int) -> tuple[dict, dict, dict]:
    """``(initial, ours, theirs)`` weights (open_clip layout) after ``steps`` steps of each trainer."""
    from open_clip_train.data import DataInfo  # open_clip_train only after prepare() (see main)
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    validate(cfg, world)
    train = cfg["train"]
    ds_config = build_ds_config(default_ds_config(False), "<default>", global_batch=train["global_batch_size"],
                                world_size=world, on_cuda=False)  # fmt: skip
    patch_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo")
    with Trainer(cfg, ds_config, Path(train["output_dir"]), rank, world) as trainer:
        init = {k: v.detach().clone() for k, v in to_open_clip_state_dict(trainer.engine.module.state_dict()).items()}
        batches = [b for _, b in zip(range(steps), trainer.open_loader(), strict=False)]
        if len(batches) < steps:
            raise SystemExit(f"only {len(batches)} steps in an epoch of this data; lower --steps")
        for images, tokens, keys in batches:
            trainer.train_step(images, tokens, keys)
        ours = to_open_clip_state_dict(trainer.engine.module.state_dict())

    oc_args = open_clip_train_args(cfg, world, rank, ds_config["gradient_clipping"])
    open_clip = open_clip_with_configs()
    model = open_clip.create_model(trainer.bundle.name, output_dict=True)
    model.load_state_dict(init)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = open_clip_optimizer(model, oc_args)
    scheduler = cosine_lr(optimizer, oc_args.lr, oc_args.warmup, trainer.total_steps)
    feed = _Batches([(images, tokens) for images, tokens, _ in batches], train["global_batch_size"])
    loss = open_clip.create_loss(oc_args)
    train_one_epoch(ddp, {"train": DataInfo(feed)}, loss, 0, optimizer, None, scheduler, None, oc_args)
    return init, ours, {k: v.detach() for k, v in model.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps of each trainer (K)")
    p.add_argument("--out", type=Path, required=True, help="JSON report (written by rank 0)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="our run config override (repeatable); loss.name is openclip, data.augment false (both trainers get "
        "the same images), train.output_dir a temp dir",
    )
    args = p.parse_args(argv)

    from run_open_clip_train import prepare  # launchers/ is on sys.path when this file runs as a script

    prepare()
    world, rank, _ = distributed_env()
    with tempfile.TemporaryDirectory(prefix="update_parity_") as run_dir:  # our trainer's logs; nothing is kept
        fixed = ["data.augment=false", "data.num_workers=0", f"train.output_dir={run_dir}"]
        cfg = load_config(None, ["loss.name=openclip", *args.set, *fixed])
        init, ours, theirs = train_both(cfg, world, rank, args.steps)
    if rank == 0:
        report = {"steps": args.steps, "world_size": world, "config": cfg.values, **parity(ours, theirs, init)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        worst = sorted(report["per_tensor"].items(), key=lambda kv: -(kv[1]["gap_over_update"] or 0))[:5]
        print(f"worst gap/update over {report['moved']} moved tensors: {report['worst_gap_over_update']:.3e}")
        for name, row in worst:
            print(f"  {name}: gap {row['max_gap']:.3e}  update {row['max_update']:.3e}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
