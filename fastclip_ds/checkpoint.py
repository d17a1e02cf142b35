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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import comm, ds_compat

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
    tag, rank = tag_for(step), comm.rank()
    if rank == 0 and (ckpt_dir / tag).exists():
        _remove(ckpt_dir, tag)  # a stale save of the same step (a crashed run)
    comm.barrier("checkpoint_save")
    client_state = {**client_state, **ds_compat.universal_info()}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    loss_fn.save_state(ckpt_dir / tag / "loss_state")
    (ckpt_dir / tag / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), ckpt_dir / tag / "rng" / f"rank_{rank}.pt")
    comm.barrier("checkpoint_save")
    if rank == 0:
        meta = {"step": step, "world_size": comm.world_size(), "zero_stage": engine.zero_optimization_stage()}
        _atomic_write(ckpt_dir / tag / COMPLETE, json.dumps(meta) + "\n")
        _atomic_write(ckpt_dir / LATEST, tag + "\n")
        _prune(ckpt_dir, keep, tag)
    comm.barrier("checkpoint_save")
    return tag


def resolve(ckpt_dir: Path, spec: str, option: str = "--resume") -> str:
    """``latest`` or a tag name → an existing, complete tag; otherwise a one-line error naming ``option spec``."""
    tag = read_latest(ckpt_dir) if spec == LATEST else spec
    if tag is None:
        raise FileNotFoundError(f"{option} {spec}: no checkpoint in {ckpt_dir} (no '{LATEST}' file)")
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{option} {spec}: {ckpt_dir / tag} does not exist")
    if not is_complete(ckpt_dir, tag):
        raise FileNotFoundError(f"{option} {spec}: {ckpt_dir / tag} is incomplete (no {COMPLETE}: a save was cut off)")
    return tag


def to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Convert ``tag`` to DeepSpeed's universal format under ``ckpt_dir/universal`` (rank 0, once; what
    ``python -m deepspeed.checkpoint.ds_to_universal`` does) and return that directory. Call on every rank."""
    out = ckpt_dir / UNIVERSAL / tag
    if comm.rank() == 0 and not out.is_dir():
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
    comm.barrier("checkpoint_universal")
    return out.parent


def load(engine: Any, loss_fn: Any, ckpt_dir: Path, tag: str, *, universal: bool = False) -> dict[str, Any]:
    """Load on every rank; returns the client state saved with the tag. ``universal``: a different world size,
    from :func:`to_universal`'s output, loaded by :func:`ds_compat.universal_load` (at ZeRO-3 the trainer sets
    DeepSpeed's ``checkpoint.load_universal``). RNG states are restored when the world size is unchanged (per
    rank)."""
    load_dir = ckpt_dir / UNIVERSAL if universal else ckpt_dir
    with ds_compat.universal_load(engine, load_dir / tag) if universal else nullcontext(True) as optimizer_states:
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=optimizer_states)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    loss_fn.load_state(ckpt_dir / tag / "loss_state")
    if saved_meta(ckpt_dir, tag)["world_size"] == comm.world_size():
        # our own file: python/numpy states are tuples with arrays, which weights_only refuses
        set_rng_state(torch.load(ckpt_dir / tag / "rng" / f"rank_{comm.rank()}.pt", weights_only=False))
    return client_state or {}
