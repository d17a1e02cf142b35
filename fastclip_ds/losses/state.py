"""Per-sample loss state (log u, and for per-sample τ the τ and Adam moments), sharded over ranks.

Ownership: key ``k`` (an integer in ``[0, n)``) lives on rank ``k % K`` at row ``k // K`` of that rank's
table, so each rank holds ``ceil((n - rank) / K)`` rows of ``S`` named columns. A step reads the rows of
the global batch with :meth:`ShardedState.fetch` (owners fill their rows, everybody else zeros) followed by
one all-reduce, and the owners write the updated rows back with :meth:`ShardedState.write`.

Checkpoint layout: one file ``shard_<rank>_of_<K>.pt`` per rank. :meth:`ShardedState.load` reads every
shard of the saved world size and keeps the keys the current rank owns, so a checkpoint written at one
world size loads at any other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_SHARD = re.compile(r"shard_(\d+)_of_(\d+)\.pt")


def shard_rows(n: int, rank: int, world: int) -> int:
    """Number of keys in ``[0, n)`` owned by ``rank``: ``len(range(rank, n, world))``."""
    return max(0, (n - rank + world - 1) // world)


class ShardedState(torch.nn.Module):
    """``[rows, S]`` table of this rank's keys; ``init`` gives each column's value for an unseen key."""

    def __init__(self, n: int, init: dict[str, float], *, rank: int, world: int, dtype: torch.dtype) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"loss state: dataset_size must be >= 1 (got {n})")
        self.n, self.rank, self.world, self.names = n, rank, world, list(init)
        self.register_buffer("init", torch.tensor(list(init.values()), dtype=dtype), persistent=False)
        table = self.init.expand(shard_rows(n, rank, world), len(init)).clone()
        self.register_buffer("table", table, persistent=False)

    def column(self, name: str) -> int:
        return self.names.index(name)

    def _check(self, keys: Tensor) -> None:
        if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= self.n):
            raise ValueError(
                f"loss state: sample key out of range [0, {self.n}) (min {int(keys.min())}, max {int(keys.max())}); "
                "set data.dataset_size above the largest key"
            )

    def fetch(self, keys: Tensor) -> Tensor:
        """``[len(keys), S]``: the rows of the keys this rank owns, zeros elsewhere (sum over ranks = all rows)."""
        self._check(keys)
        mine = keys % self.world == self.rank
        out = torch.zeros(keys.shape[0], len(self.names), dtype=self.table.dtype, device=self.table.device)
        out[mine] = self.table[keys[mine] // self.world]
        return out

    def write(self, keys: Tensor, values: Tensor) -> None:
        """Store ``values[i]`` for every ``keys[i]`` this rank owns (duplicate keys must carry equal rows)."""
        mine = keys % self.world == self.rank
        self.table[keys[mine] // self.world] = values[mine].to(self.table.dtype)

    def save(self, directory: Path, meta: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        blob = {"n": self.n, "names": self.names, "table": self.table.cpu(), "meta": meta}
        torch.save(blob, directory / f"shard_{self.rank}_of_{self.world}.pt")

    def load(self, directory: Path) -> dict[str, Any]:
        """Load (resharding if the saved world size differs); returns the saved ``meta``."""
        found = {int(m[1]): int(m[2]) for p in directory.glob("shard_*_of_*.pt") if (m := _SHARD.fullmatch(p.name))}
        worlds = set(found.values())
        if len(worlds) != 1 or sorted(found) != list(range(next(iter(worlds)))):
            raise FileNotFoundError(f"loss state: {directory} has no complete set of shard_<r>_of_<K>.pt files")
        old_world = worlds.pop()
        meta: dict[str, Any] = {}
        for old_rank in range(old_world):
            path = directory / f"shard_{old_rank}_of_{old_world}.pt"
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob["n"] != self.n or blob["names"] != self.names:
                raise ValueError(
                    f"loss state: {path} holds {blob['n']} keys x {blob['names']}, expected {self.n} x {self.names}"
                )
            keys = old_rank + old_world * torch.arange(blob["table"].shape[0])
            mine = keys % self.world == self.rank
            self.table[(keys[mine] // self.world).to(self.table.device)] = blob["table"][mine].to(self.table)
            meta = meta or blob["meta"]
        return meta
