"""Sharded per-sample state: ownership, and save -> load at a different world size (no process group needed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fastclip_ds.losses.state import ShardedState, shard_rows

INIT = {"log_u1": -math.inf, "log_u2": -math.inf, "tau1": 0.07}
N = 11


def shards(world: int) -> list[ShardedState]:
    return [ShardedState(N, INIT, rank=r, world=world, dtype=torch.float32) for r in range(world)]


def filled(world: int, seed: int) -> tuple[list[ShardedState], torch.Tensor]:
    """Shards holding a random full table (key k -> row k); some keys left unvisited (-inf)."""
    table = torch.randn(N, len(INIT), generator=torch.Generator().manual_seed(seed))
    table[::3, :2] = -math.inf
    states = shards(world)
    for s in states:
        s.write(torch.arange(N), table)
    return states, table


def assembled(states: list[ShardedState]) -> torch.Tensor:
    """The full table, as the all-reduce of every rank's fetch would give it."""
    return sum(s.fetch(torch.arange(N)).nan_to_num(neginf=0.0) for s in states)


def test_each_key_has_one_owner() -> None:
    states, table = filled(3, seed=0)
    assert [s.table.shape[0] for s in states] == [shard_rows(N, r, 3) for r in range(3)] == [4, 4, 3]
    assert torch.equal(assembled(states), table.nan_to_num(neginf=0.0))
    fresh = ShardedState(N, INIT, rank=0, world=1, dtype=torch.float32).fetch(torch.tensor([0, 5, 5]))
    assert torch.equal(fresh, torch.tensor([[-math.inf, -math.inf, 0.07]] * 3))


@pytest.mark.parametrize(("saved", "loaded"), [(2, 1), (1, 2), (2, 3)])
def test_save_load_reshards(tmp_path: Path, saved: int, loaded: int) -> None:
    states, table = filled(saved, seed=saved)
    for s in states:
        s.save(tmp_path, {"epoch": 3})
    targets = shards(loaded)
    metas = [t.load(tmp_path) for t in targets]
    assert metas == [{"epoch": 3}] * loaded
    full = torch.cat([t.fetch(torch.arange(N)) for t in targets]).reshape(loaded, N, -1)
    for r, t in enumerate(targets):
        mine = torch.arange(N) % loaded == r
        assert torch.equal(full[r][mine], table[mine])
        assert torch.equal(t.table, table[r::loaded])


def test_load_errors(tmp_path: Path) -> None:
    states, _ = filled(2, seed=0)
    states[0].save(tmp_path, {})
    with pytest.raises(FileNotFoundError, match="no complete set"):
        shards(1)[0].load(tmp_path)
    states[1].save(tmp_path, {})
    with pytest.raises(ValueError, match=r"holds 11 keys .* expected 12"):
        ShardedState(12, INIT, rank=0, world=1, dtype=torch.float32).load(tmp_path)


def test_loss_save_load_restores_state_and_schedule_position(tmp_path: Path) -> None:
    from fastclip_ds.losses import build_loss

    cfg = {"name": "fastclip_v2", "lr_tau": 0.01, "gamma_schedule": "cosine_step"}
    loss = build_loss(cfg, dataset_size=N, steps_per_epoch=4)
    x = torch.nn.functional.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    loss.set_epoch(2)
    loss(x, x.flip(0), torch.zeros(1), torch.tensor([1, 5, 7, 9]))
    loss.save_state(tmp_path)
    again = build_loss(cfg, dataset_size=N, steps_per_epoch=4)
    again.load_state(tmp_path)
    assert torch.equal(again.state.table, loss.state.table)
    assert (again.epoch, again.steps_seen, again.gamma()) == (2, 1, loss.gamma())
    assert torch.isfinite(again.state.table[[1, 5, 7, 9]]).all() and torch.isinf(again.state.table[0, 0])
