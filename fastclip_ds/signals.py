"""Graceful stop on SIGTERM / SIGUSR1 (slurm preemption): the handler only records the signal; the training loop
agrees on it across ranks once per step (see :func:`agree`) and then saves and exits 0."""

from __future__ import annotations

import signal
from types import FrameType

import torch

from . import comm

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs handlers for :data:`STOP_SIGNALS`; ``received`` is the first signal number caught (0 if none)."""

    def __init__(self) -> None:
        self.received = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = self.received or signum  # no I/O here: the handler may interrupt a write

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agree(flags: list[int], device: torch.device) -> list[int]:
    """Element-wise max of small integer flags over all ranks (one tiny all-reduce, counted as ``train_agreement``),
    so every rank takes the same decision at the same step."""
    return comm.all_reduce_max_(torch.tensor(flags, dtype=torch.int64, device=device), op="train_agreement").tolist()
