"""The interface every loss implements, and the kernel calls every loss is built on."""

from __future__ import annotations

import inspect
from pathlib import Path

import fastclip_kernels
import torch
from fastclip_kernels import BlockStats
from torch import Tensor

# Forward `impl=` to the kernels once they accept it; the dense reference (no keyword) serves "auto"/"dense".
_KERNELS_TAKE_IMPL = "impl" in inspect.signature(fastclip_kernels.block_stats).parameters


def _impl_kwargs(impl: str) -> dict[str, str]:
    if _KERNELS_TAKE_IMPL:
        return {"impl": impl}
    if impl not in ("auto", "dense"):
        raise ValueError(f"loss.impl: {impl!r} is not available in this fastclip_kernels (only the dense reference)")
    return {}


def block_stats(
    x: Tensor,
    y: Tensor,
    theta_row: Tensor,
    theta_col: Tensor | None,
    diag_offset: int,
    exclude_diag: bool,
    impl: str,
) -> BlockStats:
    return fastclip_kernels.block_stats(x, y, theta_row, theta_col, diag_offset, exclude_diag, **_impl_kwargs(impl))


def block_grads(
    x: Tensor,
    y: Tensor,
    row: tuple[Tensor, Tensor, Tensor] | None,
    col: tuple[Tensor, Tensor, Tensor] | None,
    diag_offset: int,
    exclude_diag: bool,
    impl: str,
) -> tuple[Tensor, Tensor]:
    return fastclip_kernels.block_grads(x, y, row, col, diag_offset, exclude_diag, **_impl_kwargs(impl))


class ContrastiveLoss(torch.nn.Module):
    """``forward(image_features, text_features, logit_scale, keys) -> {"loss": ..., metrics...}``.

    Features are this rank's L2-normalised ``[B, d]`` rows (rank ``r`` holds rows ``[r*B, (r+1)*B)`` of the
    global batch), ``logit_scale`` is the model's ``[1]`` parameter ``log(1/tau)``, ``keys`` the int64 global
    sample ids. ``"loss"`` is what to backpropagate: its gradient, averaged over ranks (DeepSpeed's parameter
    reduction), is the exact gradient of the global-batch objective. The other entries are detached scalars.
    """

    trains_logit_scale: bool = True

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every epoch (schedules that change per epoch)."""

    def save_state(self, directory: Path) -> None:
        """Write this rank's shard of the per-sample state (nothing for stateless losses)."""

    def load_state(self, directory: Path) -> None:
        """Read the per-sample state written by :meth:`save_state`, at any world size."""
