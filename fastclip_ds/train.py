"""Train a CLIP model with DeepSpeed.

Works as ``python -m fastclip_ds.train`` (world size 1), ``torchrun --nproc_per_node K -m fastclip_ds.train``
and ``deepspeed --num_gpus K --module fastclip_ds.train``. Without ``--config`` it trains the embedded
default: a tiny CLIP on the scikit-learn digits shards (written on first use), ending with zero-shot top-1.

Faults: SIGTERM or SIGUSR1 (e.g. slurm preemption) on any rank finishes the current step on every rank, saves
a checkpoint and exits 0; ``--resume auto`` then continues exactly (bit-identical weights and loss state to an
uninterrupted run), or on a different number of ranks (any ZeRO stage, equal up to float rounding). A non-finite loss
or gradient skips the step (``train.max_nonfinite_steps`` in a row abort); bad samples are skipped and counted
(``data.max_bad_fraction`` stops the run); a lost rank ends the others within ``train.collective_timeout_s``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import (
    ConfigError,
    RunConfig,
    check_environment,
    dataset_size,
    default_config,
    describe,
    load_config,
    total_steps,
    validate,
)
from .engine import (
    build_ds_config,
    clamp_logit_scale_after_step,
    grads_finite,
    load_ds_config,
    precision_dtype,
    steps_guarded_by_deepspeed,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastclip-ds train",
        description=__doc__,
        epilog=describe(default_config()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="run config JSON (sections data, model, loss, optimizer, train, eval); "
        "keys left out keep their defaults. Default: the embedded digits demo.",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one dotted key, e.g. --set train.lr=1e-3 --set loss.name=fastclip_v3 "
        "(value parsed as JSON, else string); repeatable, applied after --config",
    )
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="deepspeed_config",
        help="DeepSpeed JSON (ZeRO stage, bf16/fp16, gradient_clipping, ...; see ds_configs/). "
        "Batch keys are derived from train.global_batch_size. Default: ZeRO-2, fp32 on CPU, bf16 on GPU",
    )
    p.add_argument(
        "--resume",
        metavar="latest|auto|TAG",
        help="resume from RUN_DIR/checkpoints: 'latest', a tag such as step00000100, or 'auto' (latest if there is "
        "one, else start fresh: for requeued jobs). Exact mid-epoch resume; a different number of ranks is fine "
        "at any ZeRO stage (ZeRO-1/2/3 states go through a DeepSpeed universal checkpoint, made once under "
        "checkpoints/universal/)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved run config and exit")
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; the LOCAL_RANK environment variable is used instead",
    )
    p.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed convention; has no effect")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env() -> tuple[int, int, int]:
    """(world, rank, local_rank) from the launcher's environment; a plain ``python`` run is world size 1."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row); the message is one line."""


@dataclass
class Position:
    """Where training stands: the next step to run."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict[str, Any], run_dir: Path, rank: int, world: int) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from .data import steps_per_epoch
        from .losses import build_loss
        from .metrics import MetricsLogger
        from .model import create_model
        from .optim import build_optimizer, build_scheduler, enable_layerwise_lamb

        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        self.ckpt_dir = run_dir / "checkpoints"
        train = cfg["train"]
        torch.manual_seed(train["seed"])
        self.device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
        self.dtype = precision_dtype(ds_config)
        self.steps_per_epoch = steps_per_epoch(cfg["data"]["num_samples"], train["global_batch_size"])
        self.total_steps = total_steps(cfg)
        self.last_tau = cfg["loss"]["temperature"]

        self.bundle = create_model(
            cfg["model"]["config"], init_temperature=cfg["loss"]["temperature"], seed=train["seed"]
        )
        self.loss_fn = build_loss(
            cfg["loss"], dataset_size=dataset_size(cfg), steps_per_epoch=self.steps_per_epoch, lr=train["lr"]
        )
        model = self.bundle.model
        lr_tau = cfg["loss"]["lr_tau"]
        optimizer = build_optimizer(
            model, cfg["optimizer"], lr=train["lr"], lr_tau=lr_tau, train_logit_scale=self.loss_fn.trains_logit_scale
        )
        clamp_logit_scale_after_step(optimizer)
        scheduler = build_scheduler(
            optimizer,
            warmup_steps=train["warmup_steps"],
            total_steps=self.total_steps,
            lr_min=train["lr_min"],
            lr_scheduler=train["lr_scheduler"],
            tau_scheduler=cfg["loss"]["tau_scheduler"],
            tau_fn=self.tau,
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        enable_layerwise_lamb(self.engine)
        self.loss_fn.to(self.device)
        self.loss_fn.defer_updates = True  # the u/τ write waits until the step is known to be applied
        self.metrics = MetricsLogger(run_dir, enabled=rank == 0)
        self.pos = Position()
        self.saved_step = -1
        self.nonfinite_steps = 0

    def tau(self) -> float:
        return self.last_tau

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> str:
        """Save at the current step (once per step)."""
        if self.saved_step == self.pos.global_step:
            return checkpoint.tag_for(self.saved_step)
        state = {
            "position": vars(self.pos),
            "config": self.cfg.values,
            "last_tau": self.last_tau,
            "nonfinite_steps": self.nonfinite_steps,
        }
        tag = checkpoint.save(
            self.engine,
            self.loss_fn,
            self.ckpt_dir,
            self.pos.global_step,
            state,
            keep=self.cfg["train"]["keep_checkpoints"],
        )
        self.saved_step = self.pos.global_step
        return tag

    def resume(self, tag: str, *, universal: bool) -> None:
        state = checkpoint.load(self.engine, self.loss_fn, self.ckpt_dir, tag, universal=universal)
        self.pos = Position(**state["position"])
        self.last_tau, self.nonfinite_steps = state["last_tau"], state["nonfinite_steps"]
        self.saved_step = self.pos.global_step
        if self.pos.step_in_epoch >= self.steps_per_epoch:
            self.pos.epoch, self.pos.step_in_epoch = self.pos.epoch + 1, 0
        if self.rank == 0:
            print(
                f"resumed from {self.ckpt_dir / tag} at epoch {self.pos.epoch} step {self.pos.global_step}", flush=True
            )

    # -- training ----------------------------------------------------------------------------------
    def train_step(
        self, images: torch.Tensor, tokens: torch.Tensor, keys: torch.Tensor, too_bad: bool
    ) -> tuple[dict[str, float], bool, int, bool]:
        """One step: ``(metrics, applied, stop signal or 0, too much bad data)``. The stop request, ``too_bad``
        and the loss check are agreed over ranks in one all-reduce between forward and backward. A non-finite loss
        (any rank) skips backward; non-finite gradients skip the optimizer step (DeepSpeed's own overflow check at
        ZeRO 1-3 / bf16, ours at ZeRO-0 fp32). A skipped step writes no per-sample loss state."""
        from .signals import agree

        images = images.to(self.device, self.dtype, non_blocking=True)
        out = self.engine(image=images, text=tokens.to(self.device))
        result = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"], keys.to(self.device))
        finite = bool(torch.isfinite(result["loss"].detach()).all() and torch.isfinite(result["objective"]).all())
        nonfinite, stop, bad = agree([int(not finite), self.stop.received, int(too_bad)], self.device)
        applied = False
        if not nonfinite:
            self.engine.backward(result["loss"])
            if steps_guarded_by_deepspeed(self.engine) or grads_finite(self.engine):
                self.engine.step()
                applied = self.engine.was_step_applied()
            else:
                self.engine.zero_grad()
        if applied:
            self.loss_fn.commit()
        else:
            self.loss_fn.discard()
        values = {k: float(v.detach()) for k, v in result.items()}
        if applied:
            self.last_tau = values.get("tau", self.last_tau)
        return values, applied, stop, bool(bad)

    @staticmethod
    def comm_bytes_per_step(steps: int) -> dict[str, float]:
        """Bytes this rank sent per step in each collective since the last call: the losses' own, and
        DeepSpeed's (gradient reduction, ZeRO gathers) when its ``comms_logger`` is enabled."""
        from deepspeed.comm.comm import comms_logger

        from . import comm

        sent = {**comm.bytes_by_op(), **comm.deepspeed_bytes_by_op()}
        comm.reset_bytes()
        comms_logger.comms_dict.clear()
        return {f"bytes_per_step/{op}": n / steps for op, n in sent.items()}

    def run(self) -> dict[str, float]:
        """Train to the end and evaluate (the eval metrics), or stop early on SIGTERM/SIGUSR1 after saving ({})."""
        from tqdm import tqdm

        from .signals import StopRequest

        self.stop = StopRequest()
        bar = tqdm(
            total=self.total_steps,
            initial=self.pos.global_step,
            disable=self.rank != 0,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        try:
            return self._loop(bar)
        finally:
            bar.close()
            self.stop.restore()

    def _loop(self, bar: Any) -> dict[str, float]:
        from .data import BadDataError, train_loader

        cfg, train, data = self.cfg, self.cfg["train"], self.cfg["data"]
        window_start, window_steps = time.perf_counter(), 0
        in_a_row = 0
        while self.pos.global_step < self.total_steps and self.pos.epoch < train["epochs"]:
            self.loss_fn.set_epoch(self.pos.epoch)
            loader = train_loader(
                data["train"],
                num_samples=data["num_samples"],
                global_batch=train["global_batch_size"],
                world_size=self.world,
                rank=self.rank,
                seed=train["seed"],
                epoch=self.pos.epoch,
                image_transform=self.bundle.train_transform if data["augment"] else self.bundle.eval_transform,
                tokenizer=self.bundle.tokenizer,
                num_workers=data["num_workers"],
                shuffle_buffer=data["shuffle_buffer"],
                split=data["split"],
                start_step=self.pos.step_in_epoch,
                key_limit=self.loss_fn.key_limit,
            )
            for images, tokens, keys in loader:
                too_bad = loader.bad_fraction() > data["max_bad_fraction"]
                values, applied, stop, bad = self.train_step(images, tokens, keys, too_bad)
                if bad:
                    self.metrics.log(self.pos.global_step, "data", loader.stats())
                    raise BadDataError(
                        f"{loader.bad_fraction():.1%} of the samples read on rank {self.rank} are bad, above "
                        f"data.max_bad_fraction={data['max_bad_fraction']} (here or on another rank); "
                        f"counts {loader.stats()}"
                    )
                in_a_row = 0 if applied else in_a_row + 1
                self.nonfinite_steps += not applied
                values["nonfinite_steps"] = self.nonfinite_steps
                if not applied and self.rank == 0:
                    print(f"step {self.pos.global_step + 1}: non-finite loss or gradient, step skipped", flush=True)
                if in_a_row >= train["max_nonfinite_steps"]:
                    raise TrainingStopped(
                        f"{in_a_row} non-finite steps in a row (train.max_nonfinite_steps="
                        f"{train['max_nonfinite_steps']}) at step {self.pos.global_step + 1}; "
                        f"last good checkpoint: {checkpoint.read_latest(self.ckpt_dir)}"
                    )
                self.pos.global_step += 1
                self.pos.step_in_epoch += 1
                self.pos.samples_seen += train["global_batch_size"]
                window_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}", tau=f"{self.last_tau:.4f}")
                if self.pos.global_step % train["log_every_steps"] == 0:
                    elapsed = time.perf_counter() - window_start
                    values["samples_per_s"] = window_steps * train["global_batch_size"] / elapsed
                    values["lr"] = self.engine.get_lr()[0]
                    values["epoch"] = self.pos.epoch
                    values.update(self.comm_bytes_per_step(window_steps))
                    self.metrics.log(self.pos.global_step, "train", values)
                    window_start, window_steps = time.perf_counter(), 0
                if stop or (train["save_every_steps"] and self.pos.global_step % train["save_every_steps"] == 0):
                    self.save()
                if stop:
                    self.metrics.log(self.pos.global_step, "data", loader.stats())
                    if self.rank == 0:
                        print(
                            f"stopped by {signal.Signals(stop).name} after step {self.pos.global_step}: checkpoint "
                            f"{self.ckpt_dir / checkpoint.tag_for(self.pos.global_step)}; resume with --resume latest",
                            flush=True,
                        )
                    return {}
                if cfg["eval"]["every_steps"] and self.pos.global_step % cfg["eval"]["every_steps"] == 0:
                    self.evaluate()
                if self.pos.global_step >= self.total_steps:
                    break
            else:
                self.pos.epoch, self.pos.step_in_epoch = self.pos.epoch + 1, 0
            self.metrics.log(self.pos.global_step, "data", loader.stats())
        bar.close()  # before the eval output
        self.save()
        return self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """Zero-shot on ``eval.data``: rank 0 computes; under ZeRO-3 every rank runs the forward (it gathers
        the partitioned parameters collectively), and rank 0 reports."""
        import deepspeed.comm as dist

        from .eval import evaluate

        root = self.cfg["eval"]["data"]
        if not root:
            return {}
        metrics: dict[str, float] = {}
        if self.rank == 0 or self.engine.zero_optimization_stage() == 3:
            metrics = evaluate(
                self.engine.module,
                self.bundle.tokenizer,
                self.bundle.eval_transform,
                Path(root).expanduser(),
                batch_size=self.cfg["eval"]["batch_size"],
                device=self.device,
            )
        if self.rank == 0:
            self.metrics.log(self.pos.global_step, "eval", metrics)
            print(f"zero-shot @ step {self.pos.global_step}: " + json.dumps(metrics), flush=True)
        dist.barrier()
        return metrics


def collective_failure(err: BaseException) -> bool:
    """Whether ``err`` comes from a broken process group: torch's DistError (NCCL), or gloo's plain RuntimeError
    for a peer that closed its connection or a collective that timed out."""
    from torch.distributed import DistError

    gloo = re.search(r"gloo.*(Connection (reset|closed)|[Tt]imed out)", str(err), re.DOTALL)
    return isinstance(err, DistError) or (isinstance(err, RuntimeError) and gloo is not None)


def plan_resume(cfg: RunConfig, ds_config: dict[str, Any], spec: str, world: int) -> tuple[str, bool] | None:
    """``(tag, universal)`` for ``--resume spec`` (None: ``auto`` with no checkpoint), checked before any process
    group. A different world size at ZeRO 1-3 loads through a universal checkpoint (ZeRO-0 states are not
    partitioned: they load as they are)."""
    ckpt_dir = Path(cfg["train"]["output_dir"]).expanduser() / "checkpoints"
    if spec == "auto":
        if checkpoint.read_latest(ckpt_dir) is None:
            return None
        spec = checkpoint.LATEST
    try:
        tag = checkpoint.resolve(ckpt_dir, spec)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    meta = checkpoint.saved_meta(ckpt_dir, tag)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if meta["zero_stage"] != stage:
        raise ConfigError(
            f"--resume {spec}: {tag} was saved at ZeRO stage {meta['zero_stage']}, this run uses stage {stage}"
        )
    universal = meta["world_size"] != world and stage > 0
    if meta["world_size"] != world and cfg["data"]["split"] == "rank" and int(os.environ["RANK"]) == 0:
        print(f"warning: data.split=rank: {meta['world_size']} -> {world} ranks changes the data order", flush=True)
    return tag, universal


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world, rank, _ = distributed_env()
    on_cuda = torch.cuda.is_available()
    try:
        cfg = load_config(args.config, args.set)
        validate(cfg, world)
        if args.print_config:
            print(json.dumps(cfg.values, indent=2))
            return 0
        ds_user, ds_source = load_ds_config(args.deepspeed_config, on_cuda)
        ds_config = build_ds_config(
            ds_user, ds_source, global_batch=cfg["train"]["global_batch_size"], world_size=world, on_cuda=on_cuda
        )
        run_dir = check_environment(cfg)
        if rank == 0:
            for tag in checkpoint.clean_incomplete(run_dir / "checkpoints"):
                print(f"removed incomplete checkpoint {run_dir / 'checkpoints' / tag} (a save was cut off)", flush=True)
        resume = plan_resume(cfg, ds_config, args.resume, world) if args.resume else None
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    import deepspeed

    from .compat import patch_deepspeed
    from .data import BadDataError

    patch_deepspeed()
    timeout = cfg["train"]["collective_timeout_s"]
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if rank == 0:
        cfg.save(run_dir / "config.json")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    try:
        if resume and resume[1]:
            checkpoint.to_universal(run_dir / "checkpoints", resume[0])
            if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:  # DeepSpeed's own ZeRO-3 loader
                ds_config.setdefault("checkpoint", {})["load_universal"] = True
        trainer = Trainer(cfg, ds_config, run_dir, rank, world)
        if resume:
            trainer.resume(resume[0], universal=resume[1])
        metrics = trainer.run()
    except BadDataError as err:
        print(f"error: bad train data: {err}", file=sys.stderr, flush=True)
        return 1
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as err:
        if not collective_failure(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(
            f"error: rank {rank}: a collective failed: another rank died or did not answer within "
            f"train.collective_timeout_s={timeout} s ({first})",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)  # the process group is broken: a normal exit could wait on it
    trainer.metrics.close()
    if rank == 0 and metrics:
        (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"zero-shot top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  ({run_dir})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
