"""Dense reference of the block contract. Materialises the M×N similarity: tests and benchmarks only.

The contract (shared by every implementation: ``dense``, ``chunked``, ``triton``)
---------------------------------------------------------------------------------
A *block* is the similarity matrix ``S = x @ y.T`` of ``M`` anchors ``x [M, d]`` against ``N``
candidates ``y [N, d]``. Its *positive* pairs are ``(i, i + diag_offset)`` for the ``i`` with
``0 <= i + diag_offset < N`` (``diag_offset = rank * B`` for local rows against global columns,
``-rank * B`` for global rows against local columns). With ``exclude_diag`` the positive pairs
are left out of every reduction below (the FastCLIP ``g``); without it they are included
(the OpenCLIP cross-entropy).

``block_stats`` (forward, statistics only, all float32 or float64):

    lse_row[i] = log  sum_j exp(theta_row[i] * S_ij)          mom_row[i] = sum_j p_ij * S_ij
    lse_col[j] = log  sum_i exp(theta_col[j] * S_ij)          mom_col[j] = sum_i q_ij * S_ij

with ``p_ij`` (``q_ij``) the softmax of ``theta * S`` along the row (column). A row or column
with no admissible entry gets ``lse = -inf`` and ``mom = 0``. ``theta_col=None`` skips the
column side (returns ``None`` for it).

``block_grads`` (backward: the gradient of ``L = sum_i a_row[i] sum_j exp(theta_row[i] S_ij - b_row[i])
+ sum_j a_col[j] sum_i exp(theta_col[j] S_ij - b_col[j])`` with ``a, b, theta`` held constant):

    G_ij = a_row[i] theta_row[i] exp(theta_row[i] S_ij - b_row[i])
         + a_col[j] theta_col[j] exp(theta_col[j] S_ij - b_col[j])      (0 on excluded pairs)
    dx = G @ y,  dy = G.T @ x       (``need_dy=False``: dy is None and never computed)

Either side may be ``None`` (its term is dropped). ``theta``, ``a`` and ``b`` are 1-D tensors of
length M (row side) or N (column side), or 1-element tensors broadcast along it. Choosing
``b = lse`` and ``a = upstream gradient of lse`` gives the backward of a log-sum-exp; choosing
``b = S_ii*theta + log(eps + u_i) + log(N - 1)`` gives the FastCLIP weights
``exp((S_ij - S_ii)/tau - log(eps + u_i)) / (N - 1)``. Gradients with respect to ``theta`` follow
from the statistics: ``d/dtheta_i sum_j exp(theta_i S_ij - b_i) = exp(lse_i - b_i) * mom_i``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class BlockStats(NamedTuple):
    lse_row: Tensor
    mom_row: Tensor
    lse_col: Tensor | None
    mom_col: Tensor | None


def stats_dtype(x: Tensor) -> torch.dtype:
    """float64 inputs keep float64; everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def positive_mask(m: int, n: int, diag_offset: int, device: torch.device) -> Tensor:
    """Boolean ``[m, n]`` mask of the positive pairs ``(i, i + diag_offset)``."""
    rows = torch.arange(m, device=device)[:, None]
    cols = torch.arange(n, device=device)[None, :]
    return cols == rows + diag_offset


def _masked_logits(s: Tensor, theta: Tensor, along_rows: bool, excluded: Tensor | None) -> Tensor:
    t = theta.to(s.dtype)
    logits = s * (t[:, None] if along_rows else t[None, :])
    return logits if excluded is None else logits.masked_fill(excluded, float("-inf"))


def _lse_and_mom(logits: Tensor, s: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    lse = torch.logsumexp(logits, dim=dim)
    p = torch.exp(logits - lse.unsqueeze(dim)).nan_to_num(0.0)
    return lse, (p * s).sum(dim)


def block_stats(
    x: Tensor,
    y: Tensor,
    theta_row: Tensor,
    theta_col: Tensor | None = None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
) -> BlockStats:
    """Row (and optionally column) log-sum-exp and softmax-mean of ``S = x @ y.T``; see module doc."""
    m, n = x.shape[0], y.shape[0]
    excluded = positive_mask(m, n, diag_offset, x.device) if exclude_diag else None
    s = x.to(stats_dtype(x)) @ y.to(stats_dtype(x)).T
    lse_row, mom_row = _lse_and_mom(_masked_logits(s, theta_row.expand(m), True, excluded), s, 1)
    if theta_col is None:
        return BlockStats(lse_row, mom_row, None, None)
    lse_col, mom_col = _lse_and_mom(_masked_logits(s, theta_col.expand(n), False, excluded), s, 0)
    return BlockStats(lse_row, mom_row, lse_col, mom_col)


def block_grads(
    x: Tensor,
    y: Tensor,
    row: tuple[Tensor, Tensor, Tensor] | None,
    col: tuple[Tensor, Tensor, Tensor] | None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
    *,
    need_dy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(dx, dy)`` for ``G`` built from ``row = (theta_row, b_row, a_row)`` and ``col = (theta_col, b_col, a_col)``.

    ``need_dy=False`` returns ``(dx, None)`` without the ``G.T @ x`` product.
    """
    m, n = x.shape[0], y.shape[0]
    dt = stats_dtype(x)
    s = x.to(dt) @ y.to(dt).T
    g = torch.zeros_like(s)
    if row is not None:
        theta, b, a = (t.to(dt).expand(m)[:, None] for t in row)
        g = g + a * theta * torch.exp(theta * s - b)
    if col is not None:
        theta, b, a = (t.to(dt).expand(n)[None, :] for t in col)
        g = g + a * theta * torch.exp(theta * s - b)
    if exclude_diag:
        g = g.masked_fill(positive_mask(m, n, diag_offset, x.device), 0.0)
    dy = (g.T @ x.to(dt)).to(y.dtype) if need_dy else None
    return (g @ y.to(dt)).to(x.dtype), dy
