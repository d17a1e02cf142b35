"""``impl`` dispatch for the block contract: dense, chunked, triton, or auto."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch
from torch import Tensor

from . import chunked, reference, schedule
from .reference import BlockStats

IMPLS = ("auto", "triton", "chunked", "dense")


def triton_module() -> ModuleType | None:
    """The Triton implementation, or None if triton does not import.

    Without CUDA it is imported with ``TRITON_INTERPRET=1`` (set here unless already set), which
    must be in the environment before the kernels are decorated.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        return importlib.import_module(".triton_block", __package__)
    except ImportError:
        return None


def resolve_impl(impl: str, x: Tensor) -> str:
    """The concrete implementation ``impl`` selects for inputs like ``x``.

    ``auto``: on CUDA, what ``schedule.fastest`` predicts faster for this dtype and shape (Triton only for
    dtypes whose kernels compile without spills); on CPU the chunked path.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if not x.is_cuda or triton_module() is None:
            return "chunked"
        major, minor = torch.cuda.get_device_capability(x.device)
        return schedule.fastest(x.shape[0], x.shape[-1], str(x.dtype).removeprefix("torch."), 10 * major + minor)
    if impl == "triton" and triton_module() is None:
        raise ValueError("impl='triton' needs the triton package, which does not import")
    return impl


def _module(impl: str, x: Tensor) -> ModuleType:
    name = resolve_impl(impl, x)
    return {"dense": reference, "chunked": chunked}.get(name) or triton_module()


def block_stats(
    x: Tensor,
    y: Tensor,
    theta_row: Tensor,
    theta_col: Tensor | None = None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
    impl: str = "auto",
) -> BlockStats:
    """Row (and column) log-sum-exp and softmax-mean of ``x @ y.T``; see ``reference``."""
    return _module(impl, x).block_stats(x, y, theta_row, theta_col, diag_offset, exclude_diag)


def block_grads(
    x: Tensor,
    y: Tensor,
    row: tuple[Tensor, Tensor, Tensor] | None,
    col: tuple[Tensor, Tensor, Tensor] | None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
    impl: str = "auto",
    *,
    need_dy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(G @ y, G.T @ x)`` for the row/column coefficients ``(theta, b, a)``; see ``reference``.

    ``need_dy=False`` returns ``(G @ y, None)`` and does no work for ``dy``.
    """
    return _module(impl, x).block_grads(x, y, row, col, diag_offset, exclude_diag, need_dy=need_dy)
