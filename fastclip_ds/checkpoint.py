"""Checkpoints: DeepSpeed engine state, per-sample loss state, RNG states and the training position; crash-safe.

Layout under ``RUN_DIR/checkpoints``::

    <tag>/                   one DeepSpeed save (tag = ``step<N>``): model, optimizer, scheduler, client state
    <tag>/loss_state/        per-rank shards of the per-sample loss state (reshard to any world size)
    <tag>/rng/rank_<r>.pt    per-rank RNG states (python, numpy, torch, CUDA)
    <tag>/complete.json      written by rank 0 once every rank has finished: {"step", "world_size", "zero_stage"}
    latest                   the newest complete tag, replaced atomically after ``complete.json``
    universal/<tag>/         DeepSpeed universal checkpoint of ``<tag>``, made on demand for an elastic resume

Crash safety: a tag without ``complete.json`` is incomplete (a process died while saving). :func:`resolve`
refuses it, :func:`clean_incomplete` deletes it, and a save first deletes a stale directory of its own tag,
so ``latest`` always names a loadable checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

LATEST = "latest"
COMPLETE = "complete.json"
UNIVERSAL = "universal"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_latest(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / LATEST
    return path.read_text().strip() if path.exists() else None


def is_complete(ckpt_dir: Path, tag: str) -> bool:
    return (ckpt_dir / tag / COMPLETE).is_file()


def saved_meta(ckpt_dir: Path, tag: str) -> dict[str, int]:
    """``{"step", "world_size", "zero_stage"}`` of a complete tag."""
    return json.loads((ckpt_dir / tag / COMPLETE).read_text())


def _tag_dirs(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())


def _remove(ckpt_dir: Path, tag: str) -> None:
    shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    shutil.rmtree(ckpt_dir / UNIVERSAL / tag, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    complete = [t for t in _tag_dirs(ckpt_dir) if is_complete(ckpt_dir, t)]
    for tag in complete[:-keep] if keep > 0 else []:
        if tag != current:
            _remove(ckpt_dir, tag)


def clean_incomplete(ckpt_dir: Path) -> list[str]:
    """Delete tag directories without ``complete.json`` (left by a crash during a save); call on one rank."""
    stale = [t for t in _tag_dirs(ckpt_dir) if not is_complete(ckpt_dir, t)]
    for tag in stale:
        _remove(ckpt_dir, tag)
    return stale


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine: Any, loss_fn: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep: int) -> str:
    """Save on every rank; returns the tag. ``keep`` > 0 keeps only that many newest complete tags."""
    tag, rank = tag_for(step), dist.get_rank()
    if rank == 0 and (ckpt_dir / tag).exists():
        _remove(ckpt_dir, tag)  # a stale save of the same step (a crashed run)
    dist.barrier()
    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**client_state, **info}, save_latest=False)
    loss_fn.save_state(ckpt_dir / tag / "loss_state")
    (ckpt_dir / tag / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), ckpt_dir / tag / "rng" / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        meta = {"step": step, "world_size": dist.get_world_size(), "zero_stage": engine.zero_optimization_stage()}
        _atomic_write(ckpt_dir / tag / COMPLETE, json.dumps(meta) + "\n")
        _atomic_write(ckpt_dir / LATEST, tag + "\n")
        _prune(ckpt_dir, keep, tag)
    dist.barrier()
    return tag


def resolve(ckpt_dir: Path, spec: str) -> str:
    """``latest`` or a tag name → an existing, complete tag; a clear error otherwise."""
    tag = read_latest(ckpt_dir) if spec == LATEST else spec
    if tag is None:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_dir} (no '{LATEST}' file)")
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"--resume {spec}: {ckpt_dir / tag} does not exist")
    if not is_complete(ckpt_dir, tag):
        raise FileNotFoundError(f"--resume {spec}: {ckpt_dir / tag} is incomplete (no {COMPLETE}: a save was cut off)")
    return tag


def to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Convert ``tag`` to DeepSpeed's universal format under ``ckpt_dir/universal`` (rank 0, once; what
    ``python -m deepspeed.checkpoint.ds_to_universal`` does) and return that directory. Call on every rank."""
    out = ckpt_dir / UNIVERSAL / tag
    if dist.get_rank() == 0 and not out.is_dir():
        tmp = out.with_name(f".{tag}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        workers = str(min(4, os.cpu_count() or 1))
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag)]
        cmd += ["--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", workers]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"converting {ckpt_dir / tag} to a universal checkpoint failed: {tail}")
        os.replace(tmp, out)
    dist.barrier()
    return out.parent


def _load_zero12_optimizer(engine: Any, folder: Path) -> None:
    """This rank's ZeRO-1/2 fp32 master fragments and optimizer states from a universal checkpoint's ``zero/``.

    DeepSpeed 0.19.8's own universal loader fails (``IndexError`` on ``steps[0]``) on a rank that holds no
    element of a parameter group, which a one-element group (``logit_scale``) always causes on >= 2 ranks.
    This does the same per-parameter loads through DeepSpeed's fragment mappings and skips such groups."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    opt = engine.optimizer
    saved = torch.load(folder / "optimizer_state.pt", weights_only=False)
    opt._load_global_state(saved)
    for i, (group, saved_group) in enumerate(zip(opt.optimizer.param_groups, saved["param_groups"], strict=True)):
        owned = [lp for lp in opt.bit16_groups[i] if lp._hp_mapping is not None]
        steps = {lp.load_hp_checkpoint_state(str(folder / opt.param_names[lp]), 0, 1) for lp in owned}
        if owned:
            flat = group["params"][0]
            if steps - {None}:
                opt.optimizer.state[flat]["step"] = (steps - {None}).pop()
            keys = {k for lp in owned for k in lp._hp_mapping.get_optim_state_keys()}
            map_to_flat_opt_states(flat, opt.bit16_groups[i], opt.optimizer.state, keys)
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def _repair_zero3_universal_load(engine: Any, groups: list[dict], settings: list[dict[str, Any]]) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal loader: it gives every parameter group the first
    group's settings (weight decay, lr), and one ``step`` tensor to every group's state, which each group's
    optimizer step then increments (wrong Adam bias corrections from the second group on)."""
    for group, own in zip(groups, settings, strict=True):
        group.update(own)
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    engine.lr_scheduler.load_state_dict(engine.lr_scheduler.state_dict())  # this step's lrs, per group


def load(engine: Any, loss_fn: Any, ckpt_dir: Path, tag: str, *, universal: bool = False) -> dict[str, Any]:
    """Load on every rank; returns the client state saved with the tag. ``universal``: a different world size,
    from :func:`to_universal`'s output: at ZeRO 1/2 module, scheduler and client state through DeepSpeed, then the
    optimizer by :func:`_load_zero12_optimizer`; at ZeRO-3 all through DeepSpeed (``checkpoint.load_universal``,
    set by the trainer), then :func:`_repair_zero3_universal_load`. RNG states are restored when the world size
    is unchanged (per rank)."""
    load_dir = ckpt_dir / UNIVERSAL if universal else ckpt_dir
    own_loader = universal and engine.zero_optimization_stage() in (1, 2)
    groups = engine.optimizer.optimizer.param_groups if universal else []
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=not own_loader)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    if own_loader:
        _load_zero12_optimizer(engine, load_dir / tag / "zero")
    elif universal:
        _repair_zero3_universal_load(engine, groups, settings)
    loss_fn.load_state(ckpt_dir / tag / "loss_state")
    if saved_meta(ckpt_dir, tag)["world_size"] == dist.get_world_size():
        # our own file: python/numpy states are tuples with arrays, which weights_only refuses
        set_rng_state(torch.load(ckpt_dir / tag / "rng" / f"rank_{dist.get_rank()}.pt", weights_only=False))
    return client_state or {}
