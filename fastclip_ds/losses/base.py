"""The interface every loss implements."""

from __future__ import annotations

from pathlib import Path

import torch


class ContrastiveLoss(torch.nn.Module):
    """``forward(image_features, text_features, logit_scale, keys) -> {"loss": ..., metrics...}``.

    Features are this rank's L2-normalised ``[B, d]`` rows (rank ``r`` holds rows ``[r*B, (r+1)*B)`` of the
    global batch), ``logit_scale`` is the multiplier ``1/tau`` the model returns (``exp`` of its parameter, as
    open_clip's ``ClipLoss`` takes it; ``[1]`` or ``[]``), ``keys`` the int64 global sample ids.
    ``"loss"`` is what to backpropagate: its gradient, averaged over ranks (DeepSpeed's parameter reduction), is
    the exact gradient of the global-batch objective. The other entries are detached scalars.
    """

    trains_logit_scale: bool = True
    key_limit: int | None = None  # keys must lie in [0, key_limit) (losses with per-sample state); None: any key
    defer_updates: bool = False  # True: forward stages its per-sample state update; commit() applies it

    def commit(self) -> None:
        """Apply the state update staged by the last training forward (with ``defer_updates``)."""

    def discard(self) -> None:
        """Drop the staged state update (the step was skipped)."""

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every epoch (schedules that change per epoch)."""

    def save_state(self, directory: Path) -> None:
        """Write this rank's shard of the per-sample state (nothing for stateless losses)."""

    def load_state(self, directory: Path) -> None:
        """Read the per-sample state written by :meth:`save_state`, at any world size."""
