"""The default split (``data.split = "streams"``): every shard byte read once per pass over the data across the
whole job, and the same global batches for every world size and worker count in a family.

The shards are dealt to ``S`` logical *streams* (``data.streams``; fewer when there are fewer shards: the largest
divisor of ``data.streams`` not above the shard count). Pass ``p`` of stream ``s`` reads the shards at positions
``s, s + S, ...`` of the shard order shuffled by ``(seed, epoch, p)``; a stream that ends its pass starts its next
one on its own. Within a shard, blocks of ``shuffle_buffer`` consecutive valid samples are shuffled by ``(seed,
epoch, pass, stream, shard, block)``. The global batch at step ``t`` is, in stream order, the next ``G / S``
samples of every stream. Rank ``r`` of ``W`` owns the streams ``[r S / W, (r + 1) S / W)`` (its rows of the
global batch are ``[r B, (r + 1) B)`` as in the other modes) and its DataLoader worker ``w`` of ``K`` a
contiguous slice of those, so nobody reads another's shards. The family: ``W`` divides ``S`` and ``S`` divides
the global batch; ``K`` is the largest divisor of ``S / W`` not above ``data.num_workers`` (the worker count
never changes the data). Each pass reads a stream's shards once; an epoch of ``num_samples`` samples reads
``num_samples / S`` samples from every stream (every sample exactly once when the shards divide evenly
over the streams and hold equal counts; otherwise a short stream starts its next pass early). Resampled
(``resampled=True``): each pass of a stream is one shard drawn with replacement, its source chosen by a smooth
weighted round robin (upsampling factor x shard count per source) at a phase of the stream's own.

Position: after each step a stream stands at ``(pass, shard, offset)`` (``offset`` valid samples of that shard
handed out; a finished shard is written as the next one at offset 0), so a resume reads only the current shard
of each stream again, up to the offset, and never an earlier one. Without a saved position, ``start_step``
replays the streams from the epoch's start without decoding (older checkpoints).

Bad data is skipped and counted as in the other modes; each rank counts the samples of its own streams. Samples
skipped to reach a resume position count only within the shard re-read.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from .data import BadDataError, Batch, Source, TrainLoader, _Decoder, _Raw

Position = tuple[int, int, int]  # (pass, shard index within the stream's pass, valid samples of it handed out)


def stream_layout(streams: int, shards: int, world_size: int, num_workers: int, global_batch: int) -> tuple[int, int]:
    """``(streams used, DataLoader workers per rank)``; a one-line ``ValueError`` outside the family."""
    if streams < 1:
        raise ValueError(f"data.streams must be positive, got {streams}")
    used = max(d for d in range(1, min(streams, shards) + 1) if streams % d == 0)
    if global_batch % used:
        raise ValueError(
            f"the global batch ({global_batch}) must be a multiple of the {used} data streams: set data.streams to a "
            "divisor of it"
        )
    if used % world_size:
        fewer = f" (only {shards} shards)" if used < streams else ""
        raise ValueError(
            f"world size {world_size} does not divide the {used} data streams{fewer}: use a world size dividing "
            f"data.streams={streams}" + (" or more shards" if fewer else "")
        )
    per_rank = used // world_size
    workers = max(d for d in range(1, min(per_rank, max(num_workers, 1)) + 1) if per_rank % d == 0)
    return used, workers


def _round_robin(weights: list[float]) -> Iterator[int]:
    """Smooth weighted round robin: index ``j`` comes up ``weights[j] / sum(weights)`` of the time, evenly spread
    (every prefix within one of its exact share when there are two)."""
    credit = [0.0] * len(weights)
    total = sum(weights)
    while True:
        credit = [c + w for c, w in zip(credit, weights, strict=True)]
        j = max(range(len(weights)), key=credit.__getitem__)
        credit[j] -= total
        yield j


def _blocks(items: Iterable[_Raw | str], size: int) -> Iterator[tuple[list[_Raw], list[str], bool]]:
    """``(valid samples, skip reasons, is the shard's last)`` per block of up to ``size`` valid samples; a full
    block is handed out once another valid sample is read, so the last block is known as such."""
    block: list[_Raw] = []
    bad: list[str] = []
    for item in items:
        if isinstance(item, str):
            bad.append(item)
        elif len(block) < size:
            block.append(item)
        else:
            yield block, bad, False
            block, bad = [item], []
    yield block, bad, True


class _StreamEpoch(_Decoder, IterableDataset):
    """One epoch of one rank's streams; worker ``w`` yields, per step, its streams' rows and their positions."""

    def __init__(
        self,
        sources: list[Source],
        *,
        global_batch: int,
        streams: int,
        world_size: int,
        rank: int,
        workers: int,
        block: int,
        positions: list[Position] | None,
        resampled: bool,
        **common: Any,
    ) -> None:
        super().__init__(sources, streams=streams, positions=positions, **common)
        self.streams, self.workers, self.block, self.resampled = streams, workers, max(block, 1), resampled
        self.per_stream = global_batch // streams  # rows of the global batch from each stream
        self.per_worker = streams // world_size // workers
        self.first_stream = rank * (streams // world_size)

    def worker_streams(self, worker: int) -> range:
        first = self.first_stream + worker * self.per_worker
        return range(first, first + self.per_worker)

    def _pass_shards(self, stream: int, pass_idx: int, source: int) -> list[str]:
        """The shards of a pass: a share of the shuffled shards, or (resampled) one shard of ``source``."""
        if self.resampled:
            return [
                random.Random(f"{self.seed}:{self.epoch}:{pass_idx}:{stream}:draw").choice(self.sources[source].urls)
            ]
        urls = list(self.urls)
        random.Random(f"{self.seed}:{self.epoch}:{pass_idx}:shards").shuffle(urls)
        return urls[stream :: self.streams]

    def _source_order(self, stream: int, first_pass: int) -> Iterator[int]:
        """The source of each pass from ``first_pass``; resampled: a smooth weighted round robin over sources weighted
        by upsampling factor x shard count, each stream at its own phase (so a batch mixes sources)."""
        weights = [src.weight * len(src.urls) for src in self.sources]
        return itertools.islice(_round_robin(weights), stream + first_pass, None)

    def _stream(self, stream: int) -> Iterator[tuple[_Raw, Position] | str]:
        """From this loader's start: the stream's valid samples, each with the position after it, and skip reasons."""
        if self.positions is None:
            (pass_idx, first, skip), skip_more = (0, 0, 0), self.start_step * self.per_stream
        else:
            (pass_idx, first, skip), skip_more = self.positions[stream], 0
        skip += skip_more
        order, misses = self._source_order(stream, pass_idx), 0
        while True:
            shards, found = self._pass_shards(stream, pass_idx, next(order)), first > 0
            for idx in range(first, len(shards)):
                items = self._shard(shards[idx])
                done = 0  # valid samples of this shard handed out or skipped
                for n, (block, bad, last) in enumerate(_blocks(items, self.block)):
                    found = found or bool(block)
                    if skip and skip >= len(block):  # before the start: not counted
                        skip, done = skip - len(block), done + len(block)
                        continue
                    yield from bad
                    random.Random(f"{self.seed}:{self.epoch}:{pass_idx}:{stream}:{idx}:{n}").shuffle(block)
                    for i, raw in enumerate(block):
                        done += 1
                        if skip:
                            skip -= 1
                        elif last and i == len(block) - 1:
                            yield raw, (pass_idx, idx + 1, 0)
                        else:
                            yield raw, (pass_idx, idx, done)
            misses = 0 if found else misses + 1
            if misses >= (len(self.urls) if self.resampled else 1):  # resampled: that many draws in a row
                raise BadDataError(
                    f"no valid sample in {misses * len(shards)} shard(s) of data stream {stream}, "
                    f"e.g. {shards[0]}: see skip warnings"
                )
            pass_idx, first = pass_idx + 1, 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        self._begin(worker)
        streams = self.worker_streams(worker)
        sources = [self._stream(s) for s in streams]
        for step in range(self.start_step, self.steps):
            rows: list[_Raw] = []
            positions: list[Position] = []
            for source in sources:
                for _ in range(self.per_stream):
                    item = next(source)
                    while isinstance(item, str):
                        self._count(worker, item)
                        item = next(source)
                    rows.append(item[0])
                positions.append(item[1])
            self.valid[worker] += len(rows)
            batch = self._decode(step, rows, worker, streams[0] * self.per_stream)
            yield *batch, torch.tensor(positions, dtype=torch.int64)


class StreamLoader(TrainLoader):
    """:class:`~fastclip_ds.data.TrainLoader` over streams; :meth:`positions` is where the streams stand."""

    dataset: _StreamEpoch

    def __init__(self, dataset: _StreamEpoch, num_workers: int) -> None:
        super().__init__(dataset, num_workers, pin_items=dataset.workers == 1)  # else pinned when joined
        self._positions = torch.full((dataset.streams, 3), -1, dtype=torch.int64)
        self._start()

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        super().set_epoch(epoch, start_step)
        self._start()

    def _start(self) -> None:
        """The step and this rank's stream positions before the next iteration's first batch (positions are known
        then only when resuming from saved ones; -1: not yet)."""
        dataset = self.dataset
        self.next_step = dataset.start_step
        self._positions.fill_(-1)
        if dataset.positions is not None:
            own = range(dataset.worker_streams(0).start, dataset.worker_streams(dataset.workers - 1).stop)
            self._positions[own] = torch.tensor([dataset.positions[s] for s in own], dtype=torch.int64)

    def _batches(self) -> Iterator[Batch]:
        self._start()
        items = self._items()
        workers = self.dataset.workers
        for parts in zip(*[items] * workers, strict=False):  # worker w's item for step t is the (t K + w)-th
            for worker, (*_, pos) in enumerate(parts):
                self._positions[self.dataset.worker_streams(worker)] = pos
            columns = zip(*(p[:3] for p in parts), strict=True)
            images, tokens, keys = (self._join(list(x)) for x in columns)
            self.next_step += 1
            yield images, tokens, keys

    def _join(self, parts: list[Tensor]) -> Tensor:
        """The workers' parts of a batch as one tensor: one worker's as it is (no copy); several concatenated, into
        pinned memory with CUDA (the DataLoader then leaves pinning to this one copy)."""
        if len(parts) == 1:
            return parts[0]
        shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
        return torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=self.pin))

    def state(self, max_over_ranks: Callable[[list[int]], list[int]]) -> dict[str, Any] | None:
        """``{"epoch", "step", "streams"}``: every stream's ``(pass, shard, offset)`` before step ``step`` of the
        epoch, for ``train_loader(resume=...)``. Collective: ``max_over_ranks`` is an element-wise max over all
        ranks (each rank fills its own streams, -1 elsewhere)."""
        flat = max_over_ranks(self._positions.flatten().tolist())
        if min(flat) < 0:  # a replaying loader before its first batch: its resume replays too
            return None
        streams = [flat[i : i + 3] for i in range(0, len(flat), 3)]
        return {"epoch": self.dataset.epoch, "step": self.next_step, "streams": streams}
