"""Webdataset train pipeline: per step, the rank's local batch ``(images, tokens, keys)``.

Shards are img2dataset-style tars: per sample an image (``jpg``/``jpeg``/``png``/``webp``), a caption
(``txt``) and ``json`` holding the integer sample ``key`` (the index of FastCLIP's per-sample state; optional
for a loss without per-sample state, ``key_limit=None``: such samples get key :data:`NO_KEY`).

Three ways to split the data over ranks (``split=``):

``"streams"`` (default): each shard byte read once per pass across the job, and the same global batches for
every world size and worker count in a family; see :mod:`fastclip_ds.streams`.

``"global"``: world-size invariant for any world size. Every rank, and every DataLoader worker, walks the same
seeded stream: each pass over the data shuffles the shard order by ``(seed, epoch, pass)`` and runs a
shuffle buffer seeded the same way, emptied at the end of the pass; the stream wraps into a new pass
when an epoch asks for more samples than the data has. The stream is cut into global batches of
``global_batch`` valid samples and rank ``r`` keeps rows ``[r*B, (r+1)*B)``, ``B = global_batch //
world_size``. Same seed, same epoch => the global batch at step ``t`` is the same samples in the same
order for any world size. Only the kept rows are decoded; the rest are read as raw bytes.
Cost: every rank (and every worker) reads all shard bytes, and the shuffle buffer holds
``shuffle_buffer`` raw samples per worker.

``"rank"``: OpenCLIP-style. Each pass shuffles the shards by ``(seed, epoch, pass)``; rank ``r`` takes
every ``world_size``-th shard from ``r``, worker ``w`` every ``num_workers``-th of those, and batches
its own shuffled stream. Needs ``>= world_size * num_workers`` shards. Reads each byte once, but the
batches depend on the world size and worker count (resume is exact only with both unchanged).

Bad data is skipped and counted per reason (see :data:`REASONS`; a warning once per reason and loader), from the
raw bytes, so all readers of a sample make the same grouping decision: a missing image, an image whose header PIL
cannot identify, a missing/empty caption, a missing/non-integer ``json`` key (where keys are needed; a shard
without any key stops the run), and a corrupt tar (a read error, or no end-of-archive block where it stops: cut or
bad header; the rest of that tar is skipped, including the sample being read). An image whose header parses but
whose full decode fails on the owning rank is replaced by a black image of the header's size (key and caption
kept, so every rank's batch stays aligned) and counted as ``image_substituted``.
Counts: :meth:`TrainLoader.stats`; :meth:`TrainLoader.bad_fraction` is the share of bad samples among those read
(the trainer stops past ``data.max_bad_fraction``). A pass over the data with no valid sample at all raises
:class:`BadDataError`. In ``"global"`` mode every rank counts the same skipped samples
(``image_substituted`` only on the owning rank); in ``"rank"`` and ``"streams"`` mode each rank counts its own.

Augmentation is reproducible: each row's transform runs under a torch seed derived from
``(seed, epoch, step, global row)``, inside a forked RNG so the caller's torch RNG is untouched.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import random
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REASONS = ("no_image", "bad_image", "no_caption", "no_key", "key_out_of_range", "corrupt_tar", "image_substituted")
SPLITS = ("streams", "global", "rank")
PREFETCH = 4  # items each DataLoader worker keeps ready: batches, or (streams) its part of 4 steps
SHUFFLE_BUFFER = 5000  # OpenCLIP's sample shuffle buffer
CSV_CHUNK = 1000  # CSV rows that stand for one shard
NO_KEY = -1  # the key of a sample without one, for losses without per-sample state

Batch = tuple[Tensor, Tensor, Tensor]


class BadDataError(RuntimeError):
    """The train data cannot feed a step (every sample of a pass is bad); the message is one line."""


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Optimizer steps in one epoch: ``num_samples // global_batch`` (the last partial batch is dropped)."""
    return num_samples // global_batch


def default_workers() -> int:
    """DataLoader workers per rank when none are given: this process's CPUs shared by the node's ranks
    (``LOCAL_WORLD_SIZE``), one left to each rank, at least 1 and at most 8."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, len(os.sched_getaffinity(0)) // local_ranks - 1))


def expand_urls(pattern: str) -> list[str]:
    """Shard URLs of a pattern: ``::``-joined parts, ``{a..b}`` braces, ``~`` and ``$WDS_*`` expansion."""
    urls = [os.path.expanduser(u) for u in wds.shardlists.expand_urls(pattern)]
    if not urls or not all(urls):
        raise ValueError(f"train data pattern {pattern!r} expands to no shards (or to an empty name)")
    return urls


@dataclass(frozen=True)
class Source:
    """One ``::``-separated part of the train pattern: its shards, where its keys land in the per-sample state
    (``key_offset + key`` for a key in ``[0, key_limit)``; no limit: any key, or none), its upsampling factor."""

    urls: tuple[str, ...]
    key_offset: int = 0
    key_limit: int | None = None
    weight: float = 1.0
    csv: CsvLayout | None = None  # a CSV source: its urls are ``file.csv#first-end`` row ranges


@dataclass(frozen=True)
class CsvLayout:
    """OpenCLIP's CSV input (``--csv-img-key``, ``--csv-caption-key``, ``--csv-separator``): one row per sample,
    an image path (as given: relative paths from the working directory) and a caption; the key is the row number."""

    img_key: str = "filepath"
    caption_key: str = "title"
    separator: str = "\t"


def _csv_rows(path: str, layout: CsvLayout) -> Iterator[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=layout.separator)
        missing = {layout.img_key, layout.caption_key} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: no column {sorted(missing)[0]!r} (columns: {reader.fieldnames})")
        yield from reader


def _csv_chunks(path: str, layout: CsvLayout) -> tuple[str, ...]:
    """The row ranges (``CSV_CHUNK`` rows each) that stand for shards."""
    rows = sum(1 for _ in _csv_rows(path, layout))
    return tuple(f"{path}#{a}-{min(a + CSV_CHUNK, rows)}" for a in range(0, rows, CSV_CHUNK))


def _read_csv(url: str, layout: CsvLayout) -> Iterator[dict[str, bytes]]:
    """The rows of a ``file.csv#first-end`` range as tar-like member groups (image under ``jpg``: PIL reads the
    format from the bytes); a missing image file makes a sample without image (skipped as ``no_image``)."""
    path, _, span = url.rpartition("#")
    first, end = map(int, span.split("-"))
    for key, row in enumerate(itertools.islice(_csv_rows(path, layout), first, end), start=first):
        sample = {"txt": row[layout.caption_key].encode(), "json": json.dumps({"key": key}).encode()}
        try:
            with open(row[layout.img_key], "rb") as f:
                sample["jpg"] = f.read()
        except OSError:
            pass
        yield sample


def parse_sources(
    pattern: str,
    key_limit: int | None,
    sizes: list[int] | None = None,
    weights: list[float] | None = None,
    csv_layout: CsvLayout | None = None,
) -> list[Source]:
    """The pattern's sources. Without ``sizes`` all parts share one key space ``[0, key_limit)``; with them, part
    ``j``'s keys ``[0, sizes[j])`` map to ``sum(sizes[:j]) + key`` (``key_limit`` is then their sum, or None)."""
    parts = pattern.split("::")
    for name, values in (("source sizes", sizes), ("upsampling factors", weights)):
        if values is not None and len(values) != len(parts):
            raise ValueError(f"{len(values)} {name} for {len(parts)} '::'-separated train sources")
    weights = weights or [1.0] * len(parts)
    layout = csv_layout or CsvLayout()
    shards = [
        (_csv_chunks(part, layout), layout) if part.endswith((".csv", ".tsv")) else (tuple(expand_urls(part)), None)
        for part in parts
    ]
    if sizes is None:
        return [Source(urls, 0, key_limit, w, c) for (urls, c), w in zip(shards, weights, strict=True)]
    offsets = itertools.accumulate([0, *sizes[:-1]])
    return [
        Source(urls, offset, None if key_limit is None else size, w, c)
        for (urls, c), offset, size, w in zip(shards, offsets, sizes, weights, strict=True)
    ]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


@dataclass(frozen=True)
class _Raw:
    """A sample that passed the byte-level checks; the image is not decoded yet."""

    key: int
    caption: str
    image: bytes
    size: tuple[int, int]


def _validate(sample: dict[str, bytes], key_limit: int | None) -> _Raw | str:
    """The sample, or the name of the reason to skip it; looks only at raw bytes and the image header. Without a
    ``key_limit`` (a loss without per-sample state) the key is optional: ``NO_KEY`` when missing."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return "no_image"
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError):
        return "no_caption"
    if not caption:
        return "no_caption"
    try:
        key = int(json.loads(sample["json"])["key"])
    except (KeyError, TypeError, ValueError):
        if key_limit is not None:
            return "no_key"
        key = NO_KEY
    if key_limit is not None and not 0 <= key < key_limit:
        return "key_out_of_range"
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:  # parses the header only
            size = img.size
    except Exception:  # PIL raises many types for unidentifiable bytes
        return "bad_image"
    return _Raw(key, caption, sample[ext], size)


def _shard_samples(url: str, source: Source) -> Iterator[_Raw | str]:
    """The shard's validated samples (keys moved to the source's range) and skip reasons. A shard where no sample
    has a key, read for a loss that needs keys (``key_limit`` set), raises :class:`BadDataError` naming the shard."""
    keyed, keyless = 0, 0
    for item in _read_csv(url, source.csv) if source.csv else _read_tar(url):
        out = _validate(item, source.key_limit) if isinstance(item, dict) else item
        keyed += not isinstance(out, str)
        keyless += out == "no_key"
        if isinstance(out, _Raw) and source.key_offset and out.key != NO_KEY:
            out = dataclasses.replace(out, key=source.key_offset + out.key)
        yield out
    if keyless and not keyed:
        raise BadDataError(
            f"{url}: no sample has an integer json 'key', which this loss's per-sample state needs "
            "(loss.name=openclip needs none)"
        )


class _LastRead:
    """A tar's (decompressed) stream that remembers its last ``read``: where tarfile stops iterating, that is the
    block it stopped at, which in a whole archive is the all-zero end-of-archive block."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.last = stream, None

    def read(self, size: int = -1) -> bytes:
        self.last = self.stream.read(size)
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _read_tar(url: str) -> Iterator[dict[str, bytes] | str]:
    """Member groups (extension -> bytes) of consecutive same-key files, then ``"corrupt_tar"`` on a read error.

    tarfile ends an archive silently where a header is cut short, missing or corrupt; such a tar lacks the
    end-of-archive block where iteration stopped, and counts as corrupt too (the sample being read is lost).
    """
    group_key, group = None, {}
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            tar.fileobj = tail = _LastRead(tar.fileobj)
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                if (folder, stem) != group_key:  # emit the finished sample before reading more bytes
                    if group:
                        yield group
                    group_key, group = (folder, stem), {}
                payload = tar.extractfile(member).read()
                if len(payload) != member.size:  # a truncated tar ends inside a member without raising
                    raise tarfile.ReadError(f"{member.name}: {len(payload)} of {member.size} bytes")
                group[ext.lower()] = payload
            if tail.last is not None and tail.last != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError(f"{url}: no end-of-archive block after {tar.offset} bytes")
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        yield "corrupt_tar"
        return
    if group:
        yield group


def _shuffled(items: Iterable[_Raw | str], size: int, rng: random.Random) -> Iterator[_Raw | str]:
    """Buffer shuffle of samples (skip reasons pass straight through); emptied in random order at the end."""
    buf: list[_Raw] = []
    for item in items:
        if isinstance(item, str):
            yield item
        elif len(buf) < size:
            buf.append(item)
        else:
            j = rng.randrange(size)
            yield buf[j]
            buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _row_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class _Decoder:
    """What the split modes' datasets share: the epoch's arguments (a plan in shared memory, so that persistent
    DataLoader workers take a new epoch when their next iteration begins), decoding rows into a batch, skip counts."""

    def __init__(
        self,
        sources: list[Source],
        *,
        steps: int,
        start_step: int,
        seed: int,
        epoch: int,
        image_transform: Callable,
        tokenizer: Callable,
        counts: Tensor,
        valid: Tensor,
        streams: int = 0,
        positions: list[tuple[int, int, int]] | None = None,
    ) -> None:
        self.sources, self.steps = sources, steps
        self.urls = [u for src in sources for u in src.urls]
        self._source_of = {u: src for src in sources for u in src.urls}
        self.seed, self.image_transform, self.tokenizer = seed, image_transform, tokenizer
        self.counts = counts  # [workers, len(REASONS)], shared memory: worker w writes row w
        self.valid = valid  # [workers]: valid samples in the batches worker w yielded
        self._plan = torch.zeros(3 + 3 * streams, dtype=torch.int64).share_memory_()  # see set_epoch
        self.set_epoch(epoch, start_step, positions)  # sets epoch, start_step, positions

    def __len__(self) -> int:
        return self.steps - self.start_step

    def set_epoch(self, epoch: int, start_step: int = 0, positions: list[tuple[int, int, int]] | None = None) -> None:
        """Where the next iteration starts: ``epoch``, step ``start_step`` (replayed without decoding), or each
        stream's saved ``(pass, shard, offset)`` there. Shared memory ``[epoch, start_step, has positions,
        positions...]``: a worker reads it when its next iteration begins (:meth:`_begin`)."""
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step ({start_step}) must be in [0, {self.steps}] (steps per epoch)")
        flat = [epoch, start_step, positions is not None, *itertools.chain.from_iterable(positions or ())]
        self._plan[: len(flat)] = torch.tensor(flat, dtype=torch.int64)
        self._begin()

    def _begin(self, worker: int | None = None) -> None:
        """Take the plan into this process's attributes; a worker (``worker`` given) also zeroes its counts, so they
        cover the current epoch (as its own loader's did before workers were persistent)."""
        self.epoch, self.start_step, has_positions, *flat = self._plan.tolist()
        self.positions = [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)] if has_positions else None
        if worker is not None:
            self.counts[worker], self.valid[worker] = 0, 0

    def _shard(self, url: str) -> Iterator[_Raw | str]:
        return _shard_samples(url, self._source_of[url])

    def _count(self, worker: int, reason: str, n: int = 1) -> None:
        self.counts[worker, REASONS.index(reason)] += n

    def _image(self, raw: _Raw, worker: int) -> Image.Image:
        try:
            with Image.open(io.BytesIO(raw.image)) as img:
                return img.convert("RGB")
        except Exception:  # truncated or corrupt payload behind a valid header
            self._count(worker, "image_substituted")
            return Image.new("RGB", raw.size)

    def _decode(self, step: int, rows: list[_Raw], worker: int, first_row: int) -> Batch:
        """Rows ``first_row, first_row + 1, ...`` of step ``step``'s global batch, each augmented under its own seed."""
        images = []
        with torch.random.fork_rng(devices=[]):
            for i, raw in enumerate(rows):
                torch.default_generator.manual_seed(_row_seed(self.seed, self.epoch, step, first_row + i))
                images.append(self.image_transform(self._image(raw, worker)))
        tokens = self.tokenizer([r.caption for r in rows])
        keys = torch.tensor([r.key for r in rows], dtype=torch.int64)
        return default_collate(images), tokens, keys  # in a worker: stacked straight into shared memory


class _EpochStream(_Decoder, IterableDataset):
    """One epoch's batches for one rank; in a DataLoader, worker ``w`` of ``W`` yields steps
    ``start_step + w, start_step + w + W, ...`` so the round-robin order is step order."""

    def __init__(
        self,
        sources: list[Source],
        *,
        global_batch: int,
        world_size: int,
        rank: int,
        workers: int,
        shuffle_buffer: int,
        split: str,
        **common: Any,
    ) -> None:
        super().__init__(sources, **common)
        self.world_size, self.rank = world_size, rank
        self.workers, self.shuffle_buffer, self.split = workers, max(shuffle_buffer, 1), split
        self.local_batch = global_batch // world_size
        # global: group whole global batches, keep this rank's rows; rank: group local batches.
        self.group = global_batch if split == "global" else self.local_batch
        self.first_row = rank * self.local_batch if split == "global" else 0
        self.seed_row = rank * self.local_batch  # this rank's first row in the global batch, for augmentation seeds

    def _pass_shards(self, stream: int, pass_idx: int) -> list[str]:
        urls = list(self.urls)
        random.Random(f"{self.seed}:{self.epoch}:{pass_idx}:shards").shuffle(urls)
        if self.split == "rank":
            urls = urls[self.rank :: self.world_size][stream :: self.workers]
        return urls

    def _samples(self, stream: int) -> Iterator[_Raw | str]:
        """The stream's validated samples and skip reasons, pass after pass."""
        rank_part = self.rank if self.split == "rank" else "all"
        for pass_idx in itertools.count():
            shards = self._pass_shards(stream, pass_idx)
            items = (s for url in shards for s in self._shard(url))
            rng = random.Random(f"{self.seed}:{self.epoch}:{pass_idx}:{rank_part}:{stream}:buffer")
            valid = 0
            for item in _shuffled(items, self.shuffle_buffer, rng):
                valid += not isinstance(item, str)
                yield item
            if not valid:
                raise BadDataError(f"no valid sample in {len(shards)} shard(s), e.g. {shards[0]}: see skip warnings")

    def _groups(self, stream: int, stride: int) -> Iterator[tuple[int, list[_Raw], Counter]]:
        """``(step, samples, skip counts while filling it)`` for steps ``stream, stream + stride, ...``."""
        step, group, bad = stream, [], Counter()
        for item in self._samples(stream):
            if isinstance(item, str):
                bad[item] += 1
                continue
            group.append(item)
            if len(group) == self.group:
                yield step, group, bad
                step, group, bad = step + stride, [], Counter()
                if step >= self.steps:  # read no further than the epoch needs
                    return

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        self._begin(worker)
        if self.split == "global":
            stream, stride = 0, 1
        else:  # stream s holds steps s (mod W); worker w serves the one with step start_step + w first
            stream, stride = (self.start_step + worker) % self.workers, self.workers
        for step, group, bad in self._groups(stream, stride):
            if step >= self.steps:
                return
            if step < self.start_step or (step - self.start_step) % self.workers != worker:
                continue
            for reason, n in bad.items():
                self._count(worker, reason, n)
            self.valid[worker] += len(group)
            yield self._decode(step, group[self.first_row : self.first_row + self.local_batch], worker, self.seed_row)


class TrainLoader:
    """Iterable over the current epoch's local batches ``(images [B,3,H,W], tokens [B,L], keys [B] int64)``;
    :meth:`set_epoch` moves it on. Its DataLoader workers are persistent: started at the first iteration, they
    serve every later one (each begins by reading the dataset's shared plan) until :meth:`close`. With CUDA, the
    batches are in pinned memory (``pin_items``: the DataLoader pins each worker's item, which is a whole batch)."""

    def __init__(self, dataset: _Decoder, num_workers: int, pin_items: bool = True) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        self.pin = torch.cuda.is_available()
        self._pin_items = self.pin and pin_items
        self._dataloader: DataLoader | None = None  # made by the first iteration with workers, dropped by close()
        self._warned: set[str] = set()
        self._wait_s, self._waits = 0.0, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Make the next iteration ``epoch`` from ``start_step`` (earlier steps replayed without decoding)."""
        self.dataset.set_epoch(epoch, start_step)

    def close(self) -> None:
        """Stop the DataLoader workers now (else when the loader is garbage collected: its iterator's finalizer);
        a later iteration starts new ones."""
        self._dataloader = None

    def __iter__(self) -> Iterator[Batch]:
        """The batches, timing the wait for each (and warning of bad data as :meth:`stats` does)."""
        batches = self._batches()
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self._wait_s, self._waits = self._wait_s + time.perf_counter() - start, self._waits + 1
            self.stats()
            if batch is None:
                return
            yield batch

    def take_wait_ms(self) -> float:
        """Mean milliseconds the caller waited for a batch since the last call (0 if it asked for none)."""
        mean = 1000 * self._wait_s / self._waits if self._waits else 0.0
        self._wait_s, self._waits = 0.0, 0
        return mean

    def _batches(self) -> Iterator[Batch]:
        return self._items()

    def _items(self) -> Iterator[Any]:
        """The dataset's items, from the DataLoader workers when there are any."""
        if self.num_workers == 0:
            yield from self.dataset
            return
        if self._dataloader is None:
            self._dataloader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=PREFETCH,
                pin_memory=self._pin_items,
                persistent_workers=True,
            )
        try:
            yield from self._dataloader
        except BadDataError as err:  # re-raised from a worker with its traceback: keep the one-line reason
            last = str(err).strip().splitlines()[-1]
            raise BadDataError(last.partition(f"{BadDataError.__name__}: ")[2] or last) from None

    def state(self, max_over_ranks: Callable[[list[int]], list[int]]) -> dict[str, Any] | None:
        """Where the data stands, for an instant resume: only in ``"streams"`` mode (None: a resume replays)."""
        return None

    def stats(self) -> dict[str, int]:
        """Skipped/substituted sample counts per reason so far (summed over workers); a reason seen for the first
        time is logged as a warning (once per reason and loader, from this process)."""
        counts = dict(zip(REASONS, self.dataset.counts.sum(0).tolist(), strict=True))
        for reason in [r for r, n in counts.items() if n and r not in self._warned]:
            self._warned.add(reason)
            log.warning("skipping bad train data (%s); further ones are only counted", reason)
        return counts

    def bad_fraction(self) -> float:
        """Bad (skipped or substituted) samples over all samples read so far (0 before any)."""
        counts = self.dataset.counts.sum(0)
        substituted = int(counts[REASONS.index("image_substituted")])
        skipped = int(counts.sum()) - substituted
        read = skipped + int(self.dataset.valid.sum())
        return (skipped + substituted) / read if read else 0.0


def train_loader(
    pattern: str,
    *,
    num_samples: int,
    global_batch: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    image_transform: Callable,
    tokenizer: Callable,
    num_workers: int | None = None,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    split: str = "streams",
    streams: int = 64,
    start_step: int = 0,
    resume: dict[str, Any] | None = None,
    key_limit: int | None = None,
    source_sizes: list[int] | None = None,
    upsampling_factors: list[float] | None = None,
    resampled: bool = False,
    csv_layout: CsvLayout | None = None,
) -> TrainLoader:
    """This rank's batches for steps ``start_step .. steps_per_epoch(num_samples, global_batch) - 1`` of ``epoch``.

    ``image_transform(PIL RGB image) -> Tensor [3,H,W]``; ``tokenizer(list[str]) -> LongTensor [n, L]``.
    ``start_step`` skips earlier steps without decoding them (exact resume); in ``"streams"`` mode a ``resume`` state
    (:meth:`~fastclip_ds.streams.StreamLoader.state`) of the same epoch and step starts each stream where it
    stood instead of replaying it (any other state is ignored). With ``key_limit``, a sample whose key lies outside
    ``[0, key_limit)`` is skipped (``key_out_of_range``); ``source_sizes`` gives each ``::``-separated source its
    own key range (:func:`parse_sources`). ``resampled`` (streams mode) draws shards with replacement, each source as
    often as its ``upsampling_factors`` entry times its shard count (OpenCLIP's meaning). A source ending in
    ``.csv``/``.tsv`` is read as ``csv_layout`` says (:class:`CsvLayout`). See the module docstring
    and :mod:`fastclip_ds.streams` for the ``split`` modes, bad-data handling and costs.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if global_batch < world_size or global_batch % world_size:
        raise ValueError(f"global_batch ({global_batch}) must be a positive multiple of world_size ({world_size})")
    steps = steps_per_epoch(num_samples, global_batch)
    if steps < 1:
        raise ValueError(f"num_samples ({num_samples}) is smaller than one global batch ({global_batch})")
    num_workers = default_workers() if num_workers is None else num_workers
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if (resampled or upsampling_factors is not None) and split != "streams":
        raise ValueError(f"resampling and upsampling factors need split='streams', got {split!r}")
    if upsampling_factors is not None and not resampled:
        raise ValueError("upsampling factors need resampled=True (as in OpenCLIP)")
    sources = parse_sources(pattern, key_limit, source_sizes, upsampling_factors, csv_layout)
    urls = [u for src in sources for u in src.urls]
    if len(set(urls)) < len(urls):
        raise ValueError(f"a shard appears twice in the train pattern {pattern!r}")
    missing = [u for src in sources if not src.csv for u in src.urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} train shard(s) not found, e.g. {missing[0]}")
    counts = torch.zeros(max(num_workers, 1), len(REASONS), dtype=torch.int64).share_memory_()
    valid = torch.zeros(max(num_workers, 1), dtype=torch.int64).share_memory_()
    if split == "streams":
        return _stream_loader(
            sources,
            steps=steps,
            global_batch=global_batch,
            streams=streams,
            world_size=world_size,
            rank=rank,
            num_workers=num_workers,
            seed=seed,
            epoch=epoch,
            image_transform=image_transform,
            tokenizer=tokenizer,
            block=shuffle_buffer,
            start_step=start_step,
            resume=resume,
            resampled=resampled,
            counts=counts,
            valid=valid,
        )
    workers = max(num_workers, 1)
    if split == "rank" and len(urls) < world_size * workers:
        raise ValueError(
            f"split='rank' needs >= world_size*num_workers = {world_size * workers} shards, got {len(urls)}; "
            "use split='global' or fewer workers"
        )
    dataset = _EpochStream(
        sources,
        steps=steps,
        global_batch=global_batch,
        world_size=world_size,
        rank=rank,
        seed=seed,
        epoch=epoch,
        image_transform=image_transform,
        tokenizer=tokenizer,
        workers=workers,
        shuffle_buffer=shuffle_buffer,
        split=split,
        start_step=start_step,
        counts=counts,
        valid=valid,
    )
    return TrainLoader(dataset, num_workers)


def _stream_loader(sources: list[Source], *, streams: int, world_size: int, num_workers: int, **kw: Any) -> TrainLoader:
    from .streams import StreamLoader, _StreamEpoch, stream_layout

    shards = sum(len(src.urls) for src in sources)
    used, workers = stream_layout(streams, shards, world_size, num_workers, kw["global_batch"])
    resume = kw.pop("resume")
    same_step = resume is not None and (resume["epoch"], resume["step"]) == (kw["epoch"], kw["start_step"])
    positions = resume["streams"] if same_step else None
    if positions is not None and len(positions) != used:
        raise ValueError(f"saved data position has {len(positions)} streams, this run reads {used}")
    dataset = _StreamEpoch(
        sources,
        streams=used,
        world_size=world_size,
        workers=workers,
        positions=None if positions is None else [tuple(p) for p in positions],
        **kw,
    )
    return StreamLoader(dataset, num_workers and workers)
