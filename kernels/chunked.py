"""The block contract (see ``reference``) in pure PyTorch, chunked over columns.

Only ``[M, chunk]`` tiles of ``S`` ever exist, so memory is O(M·chunk) beyond the inputs and
outputs, never M×N. The forward merges per-chunk row log-sum-exps online (log-space, stable at
τ = 0.01) and gets each chunk's column statistics complete from its tile; the backward
recomputes each tile and accumulates ``dx`` while writing the chunk's rows of ``dy`` (unless
``need_dy=False``, which drops the ``Gᵀ @ x`` products).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import BlockStats, stats_dtype

TILE_ELEMENTS = 1 << 22  # default tile: ~16 MiB of float32 per [M, chunk] temporary


def default_chunk(m: int) -> int:
    """Columns per tile for ``m`` rows: about ``TILE_ELEMENTS`` entries, at least 64."""
    return max(64, TILE_ELEMENTS // max(m, 1))


def _check_chunk(chunk: int | None, m: int) -> int:
    if chunk is None:
        return default_chunk(m)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return chunk


def _positives_in(c0: int, c1: int, m: int, diag_offset: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(rows, tile columns) of the positive pairs ``(i, i + diag_offset)`` whose column lies in ``[c0, c1)``."""
    cols = torch.arange(c0, c1, device=device)
    rows = cols - diag_offset
    keep = (rows >= 0) & (rows < m)
    return rows[keep], cols[keep] - c0


def _lse_mom(logits: Tensor, s: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Log-sum-exp of ``logits`` along ``dim`` and the softmax-weighted sum of ``s``; consumes ``logits``.

    One max-shifted exp pass (the shifted sum is >= 1 on lines with an admissible entry).
    """
    top = logits.amax(dim, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # empty lines: exp(-inf - 0) = 0
    p = logits.sub_(top).exp_()
    total = p.sum(dim)
    mom = torch.linalg.vecdot(p, s, dim=dim) / torch.where(total > 0, total, torch.ones_like(total))
    return top.squeeze(dim) + total.log(), mom


def _merge(lse: Tensor, mom: Tensor, lse_c: Tensor, mom_c: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial (lse, softmax-mean) pairs over disjoint index sets."""
    new = torch.logaddexp(lse, lse_c)
    shift = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    return new, mom * torch.exp(lse - shift) + mom_c * torch.exp(lse_c - shift)


def block_stats(
    x: Tensor,
    y: Tensor,
    theta_row: Tensor,
    theta_col: Tensor | None = None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
    chunk: int | None = None,
) -> BlockStats:
    """Chunked ``reference.block_stats``; ``chunk`` columns per tile (default: :func:`default_chunk`)."""
    m, n = x.shape[0], y.shape[0]
    chunk = _check_chunk(chunk, m)
    dt = stats_dtype(x)
    xs, ys = x.to(dt), y.to(dt)
    th_r = theta_row.to(dt).expand(m)[:, None]
    th_c = None if theta_col is None else theta_col.to(dt).expand(n)
    lse_r = torch.full((m,), float("-inf"), dtype=dt, device=x.device)
    mom_r = torch.zeros(m, dtype=dt, device=x.device)
    lse_c = torch.full((n,), float("-inf"), dtype=dt, device=x.device) if th_c is not None else None
    mom_c = torch.zeros(n, dtype=dt, device=x.device) if th_c is not None else None
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        s = xs @ ys[c0:c1].T
        pos = _positives_in(c0, c1, m, diag_offset, x.device) if exclude_diag else None
        logits = s * th_r
        if pos is not None:
            logits[pos] = float("-inf")
        lse_r, mom_r = _merge(lse_r, mom_r, *_lse_mom(logits, s, 1))
        if th_c is not None:
            logits = torch.mul(s, th_c[None, c0:c1], out=logits)
            if pos is not None:
                logits[pos] = float("-inf")
            lse_c[c0:c1], mom_c[c0:c1] = _lse_mom(logits, s, 0)
    return BlockStats(lse_r, mom_r, lse_c, mom_c)


def _side(coeffs: tuple[Tensor, Tensor, Tensor], length: int, dt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(theta, b, a·theta)`` expanded to ``length`` in ``dt``."""
    theta, b, a = (t.to(dt).expand(length) for t in coeffs)
    return theta, b, a * theta


def block_grads(
    x: Tensor,
    y: Tensor,
    row: tuple[Tensor, Tensor, Tensor] | None,
    col: tuple[Tensor, Tensor, Tensor] | None,
    diag_offset: int = 0,
    exclude_diag: bool = False,
    chunk: int | None = None,
    *,
    need_dy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Chunked ``reference.block_grads``: ``(dx, dy)`` with each ``G`` tile recomputed from ``x``, ``y``.

    ``need_dy=False`` returns ``(dx, None)``: no ``dy`` buffer, no ``G.T @ x`` products.
    """
    m, n = x.shape[0], y.shape[0]
    chunk = _check_chunk(chunk, m)
    dt = stats_dtype(x)
    xs, ys = x.to(dt), y.to(dt)
    dx = torch.zeros(m, x.shape[1], dtype=dt, device=x.device)
    dy = torch.zeros(n, y.shape[1], dtype=dt, device=y.device) if need_dy else None
    if row is None and col is None:
        return dx.to(x.dtype), None if dy is None else dy.to(y.dtype)
    r = None if row is None else _side(row, m, dt)
    c = None if col is None else _side(col, n, dt)
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        s = xs @ ys[c0:c1].T
        g = None
        if r is not None:
            g = torch.addcmul(-r[1][:, None], s, r[0][:, None]).exp_().mul_(r[2][:, None])
        if c is not None:  # the last use of s: transform it in place
            t = s.mul_(c[0][None, c0:c1]).sub_(c[1][None, c0:c1]).exp_().mul_(c[2][None, c0:c1])
            g = t if g is None else g.add_(t)
        if exclude_diag:
            g[_positives_in(c0, c1, m, diag_offset, x.device)] = 0.0
        dx.addmm_(g, ys[c0:c1])
        if dy is not None:
            torch.mm(g.T, xs, out=dy[c0:c1])
    return dx.to(x.dtype), None if dy is None else dy.to(y.dtype)
