"""Train a CLIP model with DeepSpeed.

Works as ``python -m fastclip_ds.train`` (world size 1), ``torchrun --nproc_per_node K -m fastclip_ds.train``
and ``deepspeed --num_gpus K --module fastclip_ds.train``. Without ``--config`` it trains the embedded
default: a tiny CLIP on the scikit-learn digits shards (written on first use), ending with zero-shot scores on
their test split (``eval.data``; every printed score names its split).

Faults: SIGTERM or SIGUSR1 (e.g. slurm preemption) on any rank finishes the current step on every rank, saves
a checkpoint and exits 0; ``--resume auto`` then continues exactly (bit-identical weights and loss state to an
uninterrupted run), or on a different number of ranks (any ZeRO stage, equal up to float rounding). A non-finite loss
or gradient skips the step (``train.max_nonfinite_steps`` in a row abort; fp16 loss-scale overflows are counted
apart and never abort); bad samples are skipped and counted
(``data.max_bad_fraction`` stops the run); a lost rank ends the others within ``train.collective_timeout_s``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from torch.distributed import DistError
from tqdm import tqdm

from . import checkpoint, comm
from .accumulate import FeatureCache
from .config import (
    ConfigError,
    RunConfig,
    check_environment,
    csv_layout,
    dataset_size,
    default_config,
    describe,
    load_config,
    total_steps,
    validate,
)
from .data import BadDataError, TrainLoader, default_workers, steps_per_epoch, train_loader
from .ds_compat import check_version, patch_deepspeed
from .engine import (
    build_ds_config,
    clamp_logit_scale_after_step,
    grads_finite,
    initialize,
    load_ds_config,
    precision_dtype,
    scaler_skips_steps,
    steps_guarded_by_deepspeed,
)
from .eval import evaluate as evaluate_split
from .logs import RunLog, progress, start_wandb
from .losses import build_loss
from .metrics import MetricsLogger
from .model import build_model
from .multiproc import free_port
from .optim import LRSchedule, build_optimizer
from .signals import StopRequest, agree


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


def distributed_env() -> tuple[int, int, int]:
    """(world, rank, local_rank) from the launcher's environment; a plain ``python`` run is world size 1."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    return int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row); the message is one line."""


@dataclass
class Position:
    """Where training stands: the next step to run."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


APPLIED, NONFINITE, OVERFLOW = "applied", "nonfinite", "overflow"


@dataclass
class StepResult:
    """What :meth:`Trainer.train_step` did. ``outcome``: ``applied``, ``nonfinite`` (a non-finite loss or gradient
    skipped the step) or ``overflow`` (the fp16 loss scaler skipped it and lowered its scale); ``stop``: the signal a
    rank received (0: none); ``bad``: a rank read more bad samples than ``data.max_bad_fraction`` allows."""

    values: dict[str, float]
    outcome: str
    stop: int
    bad: bool


class Throughput:
    """Steps and wall time since the last :meth:`take`."""

    def __init__(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def take(self) -> tuple[int, float]:
        """``(steps, seconds)`` since the last call; starts the next window."""
        now = time.perf_counter()
        window = self.steps, now - self.start
        self.start, self.steps = now, 0
        return window


class Trainer:
    """One training run on a DeepSpeed engine; all its state is created here.

    Public interface (``main`` and ``launchers/update_parity.py`` use only this): the constructor and ``with``
    (:meth:`close` restores the signal handlers and closes the metrics files), :meth:`open_loader`,
    :meth:`train_step`, :meth:`run`, :meth:`resume`, :meth:`save`, :meth:`evaluate`, :meth:`tau`, and the
    attributes ``cfg``, ``bundle`` (model, transforms, tokenizer), ``engine``, ``loss_fn``, ``pos``,
    ``steps_per_epoch`` and ``total_steps``. From construction on, SIGTERM/SIGUSR1 ask for a save and a clean exit.
    """

    def __init__(self, cfg: RunConfig, ds_config: dict[str, Any], run_dir: Path, rank: int, world: int) -> None:
        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        self.ckpt_dir = run_dir / "checkpoints"
        train = cfg["train"]
        torch.manual_seed(train["seed"])
        self.device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
        self.dtype = precision_dtype(ds_config)
        self.steps_per_epoch = steps_per_epoch(cfg["data"]["num_samples"], train["global_batch_size"])
        self.total_steps = total_steps(cfg)
        self.bundle = build_model(cfg)  # random init, starting weights (model.pretrained / train.init_from), LiT
        self.bundle.model.set_grad_checkpointing(cfg["model"]["grad_checkpointing"])
        self.loss_fn = build_loss(
            cfg["loss"], dataset_size=dataset_size(cfg), steps_per_epoch=self.steps_per_epoch, lr=train["lr"]
        )
        self.engine = self._build_engine(ds_config)
        self.loss_fn.to(self.device)
        self.loss_fn.defer_updates = True  # the u/τ write waits until the step is known to be applied
        steps = self.engine.gradient_accumulation_steps()  # train.micro_batch_size, via the DeepSpeed config
        self.accumulation = FeatureCache(self.engine, self.loss_fn, steps, self.device) if steps > 1 else None
        wandb = rank == 0 and train["wandb_project"]
        wandb_run = start_wandb(train["wandb_project"], train["wandb_mode"], run_dir, cfg.values) if wandb else None
        self.metrics = MetricsLogger(run_dir, enabled=rank == 0, wandb_run=wandb_run)
        self.stop = StopRequest()
        self.pos = Position()
        self.saved_step = -1
        self.evaluated: tuple[int, dict[str, Any]] | None = None  # (step, metrics) of the last evaluation
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient, in all
        self.nonfinite_in_a_row = 0
        self.overflow_steps = 0  # steps the fp16 loss scaler skipped, in all (they never abort the run)
        self.throughput = Throughput()
        self.loader: TrainLoader | None = None  # made by open_loader, kept across epochs
        self.data_state: dict[str, Any] | None = None  # the data position saved with the resumed checkpoint

    def _build_engine(self, ds_config: dict[str, Any]) -> Any:
        """Optimizer (τ clamped to [loss.tau_min, 1] after every step), LR / τ-LR schedule and DeepSpeed engine."""
        train, loss = self.cfg["train"], self.cfg["loss"]
        optimizer = build_optimizer(
            self.bundle.model,
            self.cfg["optimizer"],
            lr=train["lr"],
            lr_tau=loss["lr_tau"],
            train_logit_scale=self.loss_fn.trains_logit_scale,
        )
        clamp_logit_scale_after_step(optimizer, loss["tau_min"])
        scheduler = LRSchedule(
            optimizer,
            warmup_steps=train["warmup_steps"],
            total_steps=self.total_steps,
            lr_min=train["lr_min"],
            lr_scheduler=train["lr_scheduler"],
            tau_scheduler=loss["tau_scheduler"],
            tau_fn=self.tau,
        )
        return initialize(self.bundle.model, optimizer, scheduler, ds_config)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Restore the previous SIGTERM/SIGUSR1 handlers, close the metrics files, stop the train loader's workers."""
        self.stop.restore()
        self.metrics.close()
        if self.loader is not None:
            self.loader.close()

    def tau(self) -> float:
        """The global τ = exp(−logit_scale) the model holds now. DeepSpeed steps the LR schedule right after the
        optimizer, so ``step_thresh`` reads the τ just updated (and clamped), as FastCLIP's code does. ZeRO-3 holds
        the parameter partitioned while it loads a universal checkpoint (and calls the schedule): gathered then."""
        logit_scale = self.bundle.model.logit_scale
        with comm.gathered_parameters([logit_scale]):
            return math.exp(-logit_scale.detach().item())

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> str:
        """Save at the current step (once per step)."""
        if self.saved_step == self.pos.global_step:
            return checkpoint.tag_for(self.saved_step)
        state = {
            "position": vars(self.pos),
            "data": self.loader.state(partial(agree, device=self.device)) if self.loader is not None else None,
            "config": self.cfg.values,
            "nonfinite_steps": self.nonfinite_steps,
            "overflow_steps": self.overflow_steps,
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
        self.data_state = state.get("data")
        self.nonfinite_steps, self.overflow_steps = state["nonfinite_steps"], state["overflow_steps"]
        self.saved_step = self.pos.global_step
        if self.pos.step_in_epoch >= self.steps_per_epoch:
            self.pos.epoch, self.pos.step_in_epoch = self.pos.epoch + 1, 0
        if self.rank == 0:
            print(
                f"resumed from {self.ckpt_dir / tag} at epoch {self.pos.epoch} step {self.pos.global_step}", flush=True
            )

    # -- training ----------------------------------------------------------------------------------
    def open_loader(self) -> TrainLoader:
        """This rank's train loader, set to the current epoch and position: made by the first call (from the resumed
        data position, if any), moved on by later ones, so its DataLoader workers persist across epochs."""
        if self.loader is not None:
            self.loader.set_epoch(self.pos.epoch, self.pos.step_in_epoch)
            return self.loader
        train, data = self.cfg["train"], self.cfg["data"]
        self.loader = train_loader(
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
            streams=data["streams"],
            start_step=self.pos.step_in_epoch,
            resume=self.data_state,
            key_limit=self.loss_fn.key_limit,
            source_sizes=data["source_sizes"],
            upsampling_factors=data["upsampling_factors"],
            resampled=data["resampled"],
            csv_layout=csv_layout(self.cfg),
        )
        return self.loader

    def train_step(
        self, images: torch.Tensor, tokens: torch.Tensor, keys: torch.Tensor, too_bad: bool = False
    ) -> StepResult:
        """One step. The stop request, ``too_bad`` and the loss check are agreed over ranks in one all-reduce
        between forward and backward. A non-finite loss (any rank) skips backward; non-finite gradients skip the
        optimizer step (DeepSpeed's own overflow check at ZeRO 1-3 / bf16 / fp16, ours at ZeRO-0 fp32). A skipped
        step writes no per-sample loss state. With micro-batches, :mod:`~fastclip_ds.accumulate` runs the forward
        (pass 1 and the loss of the whole batch) and the backward (pass 2)."""
        images = images.to(self.device, self.dtype, non_blocking=True)
        tokens, keys = tokens.to(self.device), keys.to(self.device)
        if self.accumulation is None:
            out = self.engine(image=images, text=tokens)
            result = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"], keys)
            backward = self.engine.backward
        else:
            result, backward = self.accumulation.forward(images, tokens, keys)
        finite = bool(torch.isfinite(result["loss"].detach()).all() and torch.isfinite(result["objective"]).all())
        nonfinite, stop, bad = agree([int(not finite), self.stop.received, int(too_bad)], self.device)
        outcome = NONFINITE if nonfinite else self._backward_and_step(backward, result["loss"])
        if outcome == APPLIED:
            self.loss_fn.commit()
        else:
            self.loss_fn.discard()
        values = {k: float(v.detach()) for k, v in result.items()}
        return StepResult(values, outcome, stop, bool(bad))

    def _backward_and_step(self, backward: Callable[[torch.Tensor], Any], loss: torch.Tensor) -> str:
        """Backward and optimizer step of a finite loss; the outcome (see :class:`StepResult`)."""
        backward(loss)
        if not (steps_guarded_by_deepspeed(self.engine) or grads_finite(self.engine)):
            self.engine.zero_grad()
            return NONFINITE
        self.engine.step()
        if self.engine.was_step_applied():
            return APPLIED
        return OVERFLOW if scaler_skips_steps(self.engine) else NONFINITE

    @staticmethod
    def comm_bytes_per_step(steps: int) -> dict[str, float]:
        """Bytes this rank sent per step in each collective since the last call: the losses' own, and
        DeepSpeed's (gradient reduction, ZeRO gathers) when its ``comms_logger`` is enabled."""
        sent = {**comm.bytes_by_op(), **comm.deepspeed_bytes_by_op()}
        comm.reset_bytes()
        return {f"bytes_per_step/{op}": n / steps for op, n in sent.items()}

    def run(self) -> dict[str, Any]:
        """Train to the end, save, evaluate (the eval metrics); or stop early on SIGTERM/SIGUSR1 after saving ({})."""
        bar = tqdm(
            total=self.total_steps,
            initial=self.pos.global_step,
            disable=self.rank != 0,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        with bar:  # closed before the eval output
            while self.pos.global_step < self.total_steps and self.pos.epoch < self.cfg["train"]["epochs"]:
                if self._train_epoch(bar):
                    return {}
        self.save()
        return self.evaluate()

    def _train_epoch(self, bar: tqdm) -> bool:
        """The rest of the current epoch (or of the run); True when a stop signal ended it, after a save."""
        self.loss_fn.set_epoch(self.pos.epoch)
        loader = self.open_loader()
        for images, tokens, keys in loader:
            step = self.train_step(images, tokens, keys, loader.bad_fraction() > self.cfg["data"]["max_bad_fraction"])
            if step.bad:
                self._abort_bad_data(loader)
            self._count_skip(step.outcome)
            self._advance(bar, step.values)
            self._log(step.values)
            if step.stop:
                self._stop(step.stop, loader)
                return True
            if self._due(self.cfg["train"]["save_every_steps"]):
                self.save()
            if self._due(self.cfg["eval"]["every_steps"]):
                self.evaluate()
            if self.pos.global_step >= self.total_steps:
                break
        else:
            self.pos.epoch, self.pos.step_in_epoch = self.pos.epoch + 1, 0
        self.metrics.log(self.pos.global_step, "data", loader.stats())
        return False

    def _abort_bad_data(self, loader: TrainLoader) -> None:
        """Some rank read more bad samples than ``data.max_bad_fraction``: log the counts and stop the run."""
        self.metrics.log(self.pos.global_step, "data", loader.stats())
        raise BadDataError(
            f"{loader.bad_fraction():.1%} of the samples read on rank {self.rank} are bad, above "
            f"data.max_bad_fraction={self.cfg['data']['max_bad_fraction']} (here or on another rank); "
            f"counts {loader.stats()}"
        )

    def _count_skip(self, outcome: str) -> None:
        """Count a skipped step. ``train.max_nonfinite_steps`` non-finite steps in a row stop the run; the fp16 loss
        scaler's overflow skips are counted apart and neither stop the run nor break a run of non-finite steps."""
        if outcome == OVERFLOW:
            self.overflow_steps += 1
            return
        if outcome == APPLIED:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        step, limit = self.pos.global_step + 1, self.cfg["train"]["max_nonfinite_steps"]
        if self.rank == 0:
            print(f"step {step}: non-finite loss or gradient, step skipped", flush=True)
        if self.nonfinite_in_a_row >= limit:
            raise TrainingStopped(
                f"{self.nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_steps={limit}) at step "
                f"{step}; last good checkpoint: {checkpoint.read_latest(self.ckpt_dir)}"
            )

    def _advance(self, bar: tqdm, values: dict[str, float]) -> None:
        """Move the position and the progress bar one step on."""
        self.pos.global_step += 1
        self.pos.step_in_epoch += 1
        self.throughput.tick()
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", tau=f"{values['tau']:.4f}")

    def _log(self, values: dict[str, float]) -> None:
        """Every ``train.log_every_steps``: the step's metrics, skip counts, lr, throughput and bytes per step."""
        if not self._due(self.cfg["train"]["log_every_steps"]):
            return
        steps, seconds = self.throughput.take()
        row = {
            **values,
            "nonfinite_steps": self.nonfinite_steps,
            "overflow_steps": self.overflow_steps,
            "samples_per_s": steps * self.cfg["train"]["global_batch_size"] / seconds,
            "lr": self.engine.get_lr()[0],
            "epoch": self.pos.epoch,
            **self.comm_bytes_per_step(steps),
        }
        self.metrics.log(self.pos.global_step, "train", row)
        if self.rank == 0:
            tqdm.write(progress(self.pos.global_step, self.total_steps, row))
        self.metrics.log(self.pos.global_step, "data", {"wait_ms": self.loader.take_wait_ms(), **self.loader.stats()})

    def _stop(self, signum: int, loader: TrainLoader) -> None:
        """A rank received SIGTERM/SIGUSR1: save and say how to resume."""
        self.save()
        self.metrics.log(self.pos.global_step, "data", loader.stats())
        if self.rank == 0:
            print(
                f"stopped by {signal.Signals(signum).name} after step {self.pos.global_step}: checkpoint "
                f"{self.ckpt_dir / checkpoint.tag_for(self.pos.global_step)}; resume with --resume latest",
                flush=True,
            )

    def _due(self, every: int) -> bool:
        """Whether the step just taken is a multiple of ``every`` (0: never)."""
        return every > 0 and self.pos.global_step % every == 0

    def evaluate(self) -> dict[str, Any]:
        """Evaluate on ``eval.data`` ({} when null); the metrics name the split under ``data``. Every rank encodes
        its share (``data.num_workers`` loaders), rank 0 computes the metrics ({} elsewhere); under ZeRO-3 every rank
        runs as many forwards (they gather the partitioned parameters collectively). A second call at the same step
        (the end of a run whose last step was a periodic eval) returns the first one's metrics."""
        root = self.cfg["eval"]["data"]
        if not root:
            return {}
        if self.evaluated is not None and self.evaluated[0] == self.pos.global_step:
            return self.evaluated[1]
        workers = self.cfg["data"]["num_workers"]
        scores = evaluate_split(
            self.engine.module,
            self.bundle.tokenizer,
            self.bundle.eval_transform,
            Path(root).expanduser(),
            batch_size=self.cfg["eval"]["batch_size"],
            device=self.device,
            num_workers=default_workers() if workers is None else workers,
            lockstep=self.engine.zero_optimization_stage() == 3,
        )
        metrics: dict[str, Any] = {"data": root, **scores} if self.rank == 0 else {}
        if self.rank == 0:
            self.metrics.log(self.pos.global_step, "eval", metrics)
            print(f"eval @ step {self.pos.global_step}: {summary(metrics)}", flush=True)
        comm.barrier("eval")
        self.evaluated = (self.pos.global_step, metrics)
        return metrics


def summary(metrics: dict[str, Any]) -> str:
    """One line of eval metrics that names the split they come from."""
    numbers = "  ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "data"
    )
    return f"{numbers}  on {metrics['data']}"


def collective_failure(err: BaseException) -> bool:
    """Whether ``err`` comes from a broken process group: torch's DistError (NCCL), or gloo's plain RuntimeError
    for a peer that closed its connection or a collective that timed out."""
    gloo = re.search(r"gloo.*(Connection (reset|closed)|[Tt]imed out)", str(err), re.DOTALL)
    return isinstance(err, DistError) or (isinstance(err, RuntimeError) and gloo is not None)


def out_of_memory(cfg: RunConfig, world: int, run_dir: Path) -> str:
    """The one-line answer to a CUDA out-of-memory error: the batch sizes and the levers that lower memory."""
    train = cfg["train"]
    micro = train["micro_batch_size"] or train["global_batch_size"] // world
    return (
        f"out of memory at train.global_batch_size={train['global_batch_size']}, micro-batch {micro} per rank; "
        "lower train.micro_batch_size (exact accumulation: same result), set model.grad_checkpointing=true, raise "
        "zero_optimization.stage or offload to CPU (zero_optimization.offload_optimizer / offload_param) in the "
        f"DeepSpeed config; last good checkpoint: {checkpoint.read_latest(run_dir / 'checkpoints')}"
    )


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
        check_version()
        cfg = load_config(args.config, args.set)
        validate(cfg, world)
        if args.print_config:
            print(json.dumps(cfg.values, indent=2))
            return 0
        ds_user, ds_source = load_ds_config(args.deepspeed_config, on_cuda)
        ds_config = build_ds_config(
            ds_user,
            ds_source,
            global_batch=cfg["train"]["global_batch_size"],
            world_size=world,
            on_cuda=on_cuda,
            micro_batch=cfg["train"]["micro_batch_size"],
        )
        run_dir = check_environment(cfg)
        if rank == 0:
            for tag in checkpoint.clean_incomplete(run_dir / "checkpoints"):
                print(f"removed incomplete checkpoint {run_dir / 'checkpoints' / tag} (a save was cut off)", flush=True)
        resume = plan_resume(cfg, ds_config, args.resume, world) if args.resume else None
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    run_log = RunLog(run_dir, rank)  # RUN_DIR/out.log: rank 0's console lines, every rank's warnings
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
        with Trainer(cfg, ds_config, run_dir, rank, world) as trainer:
            if resume:
                trainer.resume(resume[0], universal=resume[1])
            metrics = trainer.run()
    except BadDataError as err:
        print(f"error: bad train data: {err}", file=sys.stderr, flush=True)
        return 1
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except torch.OutOfMemoryError:
        print(f"error: rank {rank}: {out_of_memory(cfg, world, run_dir)}", file=sys.stderr, flush=True)
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
    if rank == 0 and metrics:
        (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"eval: {summary(metrics)}  (run {run_dir})", flush=True)
    run_log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
