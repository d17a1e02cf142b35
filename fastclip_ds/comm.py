"""The communication layer: every collective of this package, on ``deepspeed.comm``.

Going through ``deepspeed.comm`` (not ``torch.distributed``) lets DeepSpeed's comms logger see the traffic;
each call passes its op name as ``log_name``. Without an initialised process group every function is the
single-process identity (world size 1, rank 0). ``tests/test_comm.py`` fails if a collective is called
anywhere else in ``fastclip_ds/``, ``kernels/`` or ``launchers/``.

Per training step, beyond DeepSpeed's own gradient reduction: the loss's collectives (FastCLIP: the packed
feature gather, the state all-reduce and the ``g`` gather; OpenCLIP: the feature gather and its gradient
reduce-scatter), the trainer's stop/skip agreement (one all-reduce of three int64 flags), and under ZeRO 1-3
with LAMB one all-reduce of per-tensor squared norms per parameter group (sub-group at ZeRO-3). Evaluation
(outside the step): :func:`all_gather_ragged` of each rank's features, and :func:`gathered_parameters` at ZeRO-3.

Byte counter: :func:`bytes_by_op` returns, per op name, the bytes *this rank sent* in every collective above
since the last :func:`reset_bytes` (barriers, outside the step, carry no payload and are not counted), under
the ring model used by DeepSpeed's comms logger and nccl-tests (``K`` ranks, ``S`` the size of the full result):

    all_gather      (K-1)/K * S   = (K-1) * local bytes
    reduce_scatter  (K-1)/K * S   (S = the full input)
    all_reduce      2(K-1)/K * S

:func:`deepspeed_bytes_by_op` applies the same model to what DeepSpeed's own comms logger recorded (its
parameter-gradient reduction and other engine collectives), when that logger is enabled.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
from torch import Tensor

from . import ds_compat

_BYTES: defaultdict[str, int] = defaultdict(int)


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (default: all)."""
    return dist.get_world_size(group=group) if dist.is_initialized() else 1


def rank(group: Any = None) -> int:
    """This rank's index in ``group`` (default: all)."""
    return dist.get_rank(group=group) if dist.is_initialized() else 0


def bytes_by_op() -> dict[str, int]:
    """Bytes this rank sent per op name since the last :func:`reset_bytes` (ring model, see module doc)."""
    return dict(_BYTES)


def reset_bytes() -> None:
    """Restart both counters: :func:`bytes_by_op` and DeepSpeed's comms log (:func:`deepspeed_bytes_by_op`)."""
    _BYTES.clear()
    ds_compat.comms_log().clear()


def _ring_factors(k: int) -> dict[str, float]:
    """Bytes sent per byte of DeepSpeed's logged message size (the ``tensor`` argument) for each raw op name."""
    gather, scatter, reduce = k - 1, (k - 1) / k, 2 * (k - 1) / k
    return {
        "all_gather": gather,
        "all_gather_into_tensor": gather,
        "reduce_scatter": scatter,
        "reduce_scatter_tensor": scatter,
        "all_reduce": reduce,
        "all_reduce_coalesced": reduce,
    }


def deepspeed_bytes_by_op() -> dict[str, int]:
    """Ring-model bytes this rank sent per collective that DeepSpeed's comms logger recorded under the op's own
    name (the engine's gradient reduction, parameter gathers, ...) since ``deepspeed.comm.reset_log()``.

    Needs the logger on (DeepSpeed config ``"comms_logger": {"enabled": true, "prof_all": true}``); the ops of
    this module carry their own names and are left out (they are in :func:`bytes_by_op`).
    """
    factors = _ring_factors(world_size())
    out: dict[str, int] = {}
    for name, by_size in ds_compat.comms_log().items():
        if name in factors:
            out[name] = round(factors[name] * sum(size * record[0] for size, record in by_size.items()))
    return out


def _count(op: str, sent: float) -> None:
    _BYTES[op] += round(sent)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def all_gather_rows(tensors: Sequence[Tensor], op: str) -> list[Tensor]:
    """All-gather several ``[B, ...]`` tensors (any dtypes, same ``B`` and device) in ONE collective, no autograd.

    The rows are packed byte-wise into one ``[B, bytes_per_row]`` uint8 buffer, gathered, and unpacked into
    ``[K*B, ...]`` tensors of the original dtypes; gathered row ``r*B + i`` is rank ``r``'s row ``i``.
    """
    k = world_size()
    if k == 1:
        return [t.detach() for t in tensors]
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        raise ValueError(f"all_gather_rows({op}): tensors disagree on the row count: {[t.shape[0] for t in tensors]}")
    parts = [t.detach().reshape(rows, -1).contiguous().view(torch.uint8) for t in tensors]
    packed = torch.cat(parts, dim=1)
    out = packed.new_empty((k * rows, packed.shape[1]))
    dist.all_gather_into_tensor(out, packed, log_name=op)
    _count(op, (k - 1) * _nbytes(packed))
    result, start = [], 0
    for t, p in zip(tensors, parts, strict=True):
        chunk = out[:, start : start + p.shape[1]].contiguous().view(t.dtype)
        result.append(chunk.reshape(k * rows, *t.shape[1:]))
        start += p.shape[1]
    return result


def all_gather_ragged(tensors: Sequence[Tensor], op: str) -> list[Tensor]:
    """All-gather ``[n_r, ...]`` tensors whose row count ``n_r`` differs between ranks (same trailing shapes and
    dtypes on every rank): each returned tensor is rank 0's rows, then rank 1's, ... (no autograd). Two collectives:
    the row counts (all-reduce), then the rows padded to the largest count (:func:`all_gather_rows`)."""
    k = world_size()
    if k == 1:
        return [t.detach() for t in tensors]
    counts = torch.zeros(k, dtype=torch.int64, device=tensors[0].device)
    counts[rank()] = tensors[0].shape[0]
    all_reduce_sum_(counts, op + "_counts")
    rows, counts = int(counts.max()), counts.tolist()
    padded = [torch.cat([t.detach(), t.new_zeros((rows - t.shape[0], *t.shape[1:]))]) for t in tensors]
    return [torch.cat([g[r * rows : r * rows + n] for r, n in enumerate(counts)]) for g in all_gather_rows(padded, op)]


@contextmanager
def gathered_parameters(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """ZeRO-3: the full values of those ``params`` partitioned right now inside (an all-gather; every rank must
    enter), partitioned again after; parameters DeepSpeed holds whole (or does not manage) are left alone."""
    with deepspeed.zero.GatheredParameters(ds_compat.partitioned(params)):
        yield


def _all_reduce_(t: Tensor, op: str, reduce_op: Any, group: Any) -> Tensor:
    k = world_size(group)
    if k > 1:
        dist.all_reduce(t, op=reduce_op, group=group, log_name=op)
        _count(op, 2 * (k - 1) / k * _nbytes(t))
    return t


def all_reduce_sum_(t: Tensor, op: str, group: Any = None) -> Tensor:
    """In-place sum over the ranks of ``group`` (default: all; no autograd); returns ``t``."""
    return _all_reduce_(t, op, dist.ReduceOp.SUM, group)


def all_reduce_max_(t: Tensor, op: str) -> Tensor:
    """In-place element-wise max over all ranks (no autograd); returns ``t``."""
    return _all_reduce_(t, op, dist.ReduceOp.MAX, None)


def barrier(op: str) -> None:
    """Wait until every rank gets here (no payload, not counted)."""
    if world_size() > 1:
        dist.barrier(log_name=op)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather rows. Backward: reduce-scatter (sum) of the gathered gradient back to its owners."""

    @staticmethod
    def forward(ctx, x: Tensor, op: str) -> Tensor:
        k = world_size()
        ctx.op, ctx.k = op, k
        out = x.new_empty((k * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), log_name=op)
        _count(op, (k - 1) * _nbytes(x))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        k = ctx.k
        out = grad.new_empty((grad.shape[0] // k, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.SUM, log_name=ctx.op + "_grad")
        _count(ctx.op + "_grad", (k - 1) / k * _nbytes(grad))
        return out, None


def gather_with_grad(x: Tensor, op: str) -> Tensor:
    """All-gather ``[B, ...]`` rows into ``[K*B, ...]`` with autograd: the backward sums every rank's gradient
    of the gathered tensor and returns each rank its own rows (OpenCLIP's ``gather_with_grad``)."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x, op)
