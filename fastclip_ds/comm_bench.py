"""Bytes per step of the loss collectives: ``openclip`` (gather with grad, reduce-scatter back) vs ``fastclip_*``.

``python -m fastclip_ds.comm_bench --world 2,4 --batch 256 --dim 512 --dtype bf16 --csv comm.csv`` spawns
K gloo ranks per world size, runs one forward + backward of each loss on random L2-normalised features
of the given per-rank batch and width, and prints what :mod:`fastclip_ds.comm` counted (bytes sent by one
rank, ring model). "feature" bytes are the collectives that carry features or feature gradients
(openclip: the gather and its gradient reduce-scatter; fastclip: the one packed gather of features and
keys); "loss total" adds fastclip's state all-reduce and u all-gather. DeepSpeed's parameter-gradient
reduction is the same for every loss and not part of this benchmark. The ranks are started by
:func:`fastclip_ds.multiproc.spawn`, as in the distributed tests.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import torch

from .multiproc import spawn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FEATURE_OPS = ("openclip_features", "openclip_features_grad", "fastclip_features")


def _bench_rank(rank: int, world: int, batch: int, dim: int, dtype: str, losses: list[str]) -> dict[str, dict]:
    from . import comm
    from .losses import build_loss

    gen = torch.Generator().manual_seed(rank)
    x = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(DTYPES[dtype])
    t = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(DTYPES[dtype])
    keys = torch.arange(batch) + rank * batch
    counts = {}
    for name in losses:
        loss = build_loss({"name": name, "lr_tau": 1e-3}, dataset_size=world * batch, steps_per_epoch=1)
        xi, ti = x.clone().requires_grad_(), t.clone().requires_grad_()
        logit_scale = torch.ones(1, requires_grad=True)  # the multiplier 1/τ
        comm.reset_bytes()
        loss(xi, ti, logit_scale, keys)["loss"].backward()
        counts[name] = comm.bytes_by_op()
    return counts


def bench(worlds: list[int], batch: int, dim: int, dtype: str, losses: list[str]) -> list[dict[str, Any]]:
    """One row per (world, loss, op) with the bytes rank 0 sent, plus ``feature`` and ``loss total`` rows."""
    rows = []
    for world in worlds:
        counts = spawn(world, _bench_rank, (batch, dim, dtype, losses))[0]
        for name, ops in counts.items():
            base = {"world": world, "batch_per_rank": batch, "dim": dim, "dtype": dtype, "loss": name}
            rows += [base | {"op": op, "bytes": n} for op, n in sorted(ops.items())]
            rows.append(base | {"op": "feature", "bytes": sum(n for op, n in ops.items() if op in FEATURE_OPS)})
            rows.append(base | {"op": "loss total", "bytes": sum(ops.values())})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastclip_ds.comm_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="2,4", help="comma-separated world sizes (default 2,4)")
    p.add_argument("--batch", type=int, default=256, help="per-rank batch (default 256)")
    p.add_argument("--dim", type=int, default=512, help="embedding width (default 512)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="feature dtype (default bf16)")
    p.add_argument("--losses", default="openclip,fastclip_v3", help="comma-separated loss names")
    p.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    a = p.parse_args(argv)
    losses = a.losses.split(",")
    rows = bench([int(w) for w in a.world.split(",")], a.batch, a.dim, a.dtype, losses)
    print(f"{'world':>5} {'loss':<12} {'op':<24} {'bytes/step':>12}")
    for r in rows:
        print(f"{r['world']:>5} {r['loss']:<12} {r['op']:<24} {r['bytes']:>12,}")
    for world in sorted({r["world"] for r in rows}):
        total = {(r["loss"], r["op"]): r["bytes"] for r in rows if r["world"] == world}
        for name in losses[1:]:
            for what in ("feature", "loss total"):
                ratio = total[(name, what)] / total[(losses[0], what)]
                print(f"world {world}: {name} / {losses[0]} {what} bytes = {ratio:.3f}")
    if a.csv:
        with a.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
