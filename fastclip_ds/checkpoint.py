"""Checkpoints: DeepSpeed engine state + per-sample loss state + training position, crash-safe ``latest``.

Layout under ``RUN_DIR/checkpoints``: one DeepSpeed tag directory per save (``step<N>``), each with a
``loss_state/`` sub-directory of per-rank shards, and a ``latest`` file naming the newest complete tag.
``latest`` is replaced atomically by rank 0 only after every rank has finished writing (a barrier), so a
process killed in the middle of a save leaves the previous ``latest`` loadable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import deepspeed.comm as dist

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def read_latest(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / LATEST
    return path.read_text().strip() if path.exists() else None


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, ckpt_dir / LATEST)


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
    for name in tags[:-keep] if keep > 0 else []:
        if name != current:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def save(engine: Any, loss_fn: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep: int) -> str:
    """Save on every rank; returns the tag. ``keep`` > 0 keeps only that many newest tags."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    loss_fn.save_state(ckpt_dir / tag / "loss_state")
    dist.barrier()
    if dist.get_rank() == 0:
        _write_latest(ckpt_dir, tag)
        _prune(ckpt_dir, keep, tag)
    dist.barrier()
    return tag


def resolve(ckpt_dir: Path, spec: str) -> str:
    """``latest`` or a tag name → an existing tag; a clear error otherwise."""
    tag = read_latest(ckpt_dir) if spec == LATEST else spec
    if tag is None:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_dir} (no '{LATEST}' file)")
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"--resume {spec}: {ckpt_dir / tag} does not exist")
    return tag


def load(engine: Any, loss_fn: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Load on every rank; returns the client state saved with the tag."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    loss_fn.load_state(ckpt_dir / tag / "loss_state")
    return client_state or {}
