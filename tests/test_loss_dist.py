"""Distributed (gloo, 2 and 4 spawned ranks): every loss gives the single-process gradient of the same global
batch, the same updated per-sample state, and state saved at 2 ranks loads at 1; openclip equals ClipLoss.
The FastCLIP losses run with the default ``tau_grad = fastclip_code``; ``fastclip_v3_exact`` with ``exact``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn.functional import normalize

from fastclip_ds import comm
from fastclip_ds.losses import build_loss
from fastclip_ds.multiproc import spawn

NAMES = ["openclip", "sogclr", "isogclr", "fastclip_v0", "fastclip_v1", "fastclip_v2", "fastclip_v3"]
CASES = {name: {"name": name} for name in NAMES} | {"fastclip_v3_exact": {"name": "fastclip_v3", "tau_grad": "exact"}}
DTYPES = {"float64": (torch.float64, 1e-10), "float32": (torch.float32, 1e-5)}
N, D_IN, D, DATASET = 8, 6, 5, 16
# step 1: first visit; step 2 (epoch 1): old and new keys, key 9 twice on different ranks for K = 2 and 4
KEYS = [torch.arange(N), torch.tensor([3, 9, 4, 10, 5, 9, 11, 1])]


def global_inputs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(N, D_IN, generator=g, dtype=torch.float64), torch.randn(
        N, D_IN, generator=g, dtype=torch.float64
    )


def run_case(name: str, dtype: str, rank: int, world: int, save_dir: Path | None) -> dict:
    """Two steps of a linear two-tower encoder (``logit_scale`` = λ, the loss gets exp(λ) as from the model);
    parameter gradients averaged over ranks as DeepSpeed does."""
    dt = DTYPES[dtype][0]
    g = torch.Generator().manual_seed(7)
    w_img = torch.randn(D_IN, D, generator=g, dtype=torch.float64).to(dt).requires_grad_()
    w_txt = torch.randn(D_IN, D, generator=g, dtype=torch.float64).to(dt).requires_grad_()
    logit_scale = torch.tensor([math.log(1 / 0.1)], dtype=dt, requires_grad=True)
    cfg = CASES[name] | {"lr_tau": 0.01, "rho": 0.5, "gamma": 0.6, "gamma_decay_epochs": 2}
    loss = build_loss(cfg, dataset_size=DATASET, steps_per_epoch=1, state_dtype=dt)
    b = N // world
    rows = slice(rank * b, (rank + 1) * b)
    steps = []
    for step, keys in enumerate(KEYS):
        loss.set_epoch(step)
        a, c = global_inputs(step)
        x = normalize(a[rows].to(dt) @ w_img, dim=1)
        t = normalize(c[rows].to(dt) @ w_txt, dim=1)
        out = loss(x, t, logit_scale.exp(), keys[rows])
        out["loss"].backward()
        grads = []
        for p in (w_img, w_txt, logit_scale):
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            grads.append(comm.all_reduce_sum_(grad.clone(), op="test_grads") / world)
            p.grad = None
        steps.append({"grads": grads, "objective": out["objective"].double()})
    if save_dir is not None:
        loss.save_state(save_dir)
    table = loss.state.table.clone() if hasattr(loss, "state") else None
    return {"steps": steps, "table": table}


def clip_loss_check(rank: int, world: int) -> list[float]:
    """Relative differences of our openclip loss vs open_clip's ClipLoss(local_loss, gather_with_grad) on this rank."""
    from fastclip_ds.compat import import_open_clip

    open_clip = import_open_clip()
    g = torch.Generator().manual_seed(rank)
    x0 = normalize(torch.randn(4, D, generator=g, dtype=torch.float64), dim=1)
    t0 = normalize(torch.randn(4, D, generator=g, dtype=torch.float64), dim=1)
    lam0 = torch.tensor([math.log(1 / 0.07)], dtype=torch.float64)
    results = []
    for use_ours in (True, False):
        x, t, lam = x0.clone().requires_grad_(), t0.clone().requires_grad_(), lam0.clone().requires_grad_()
        if use_ours:
            ours = build_loss({"name": "openclip"}, dataset_size=1, steps_per_epoch=1)
            value = ours(x, t, lam.exp(), None)["loss"]
        else:
            ref = open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
            value = ref(x, t, lam.exp())
        value.backward()
        results.append([value.detach().reshape(1), x.grad, t.grad, lam.grad])
    return [float((a - b).norm() / b.norm()) for a, b in zip(*results, strict=True)]


def worker(rank: int, world: int, save_root: str) -> dict:
    cases = {
        (name, dtype): run_case(name, dtype, rank, world, Path(save_root) / f"{name}-{dtype}")
        for name in CASES
        for dtype in DTYPES
    }
    return {"cases": cases, "clip": clip_loss_check(rank, world)}


@pytest.fixture(scope="module")
def single() -> dict:
    return {(name, dtype): run_case(name, dtype, 0, 1, None) for name in CASES for dtype in DTYPES}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_distributed_equals_single_process(world: int, single: dict, tmp_path: Path) -> None:
    results = spawn(world, worker, (str(tmp_path),), timeout=240)
    for r in results:
        assert max(r["clip"]) < 1e-10, f"openclip vs ClipLoss at {world} ranks: {r['clip']}"
    for (name, dtype), ref in single.items():
        tol = DTYPES[dtype][1]
        for rank_result in results:
            got = rank_result["cases"][(name, dtype)]
            for step, (s_got, s_ref) in enumerate(zip(got["steps"], ref["steps"], strict=True)):
                for i, (a, b) in enumerate(zip(s_got["grads"], s_ref["grads"], strict=True)):
                    if b.abs().sum() == 0:  # frozen logit_scale: zero everywhere
                        assert a.abs().sum() == 0, f"{name} {dtype} step {step}: gradient {i} should be zero"
                    else:
                        assert rel(a, b) < tol, f"{name} {dtype} step {step} gradient {i}: {rel(a, b):.2e}"
                if name != "openclip":  # fastclip's objective is the global-batch value; openclip's is rank-local
                    assert rel(s_got["objective"], s_ref["objective"]) < tol
        if ref["table"] is None:
            continue
        # the sharded state: rank r holds keys r, r+K, ... of the single-process table
        full = torch.empty_like(ref["table"])
        for r, rank_result in enumerate(results):
            full[r::world] = rank_result["cases"][(name, dtype)]["table"]
        seen = torch.isfinite(ref["table"])
        assert torch.equal(torch.isfinite(full), seen)  # the same keys visited, the rest still -inf
        for col in range(full.shape[1]):  # per column (log u, τ, Adam moments), relative in norm
            assert rel(full[:, col][seen[:, col]], ref["table"][:, col][seen[:, col]]) < tol, f"{name} {dtype} {col}"
        # saved at `world` ranks, loaded at 1
        reloaded = build_loss(
            CASES[name] | {"lr_tau": 0.01}, dataset_size=DATASET, steps_per_epoch=1, state_dtype=DTYPES[dtype][0]
        )
        reloaded.load_state(tmp_path / f"{name}-{dtype}")
        assert torch.equal(reloaded.state.table, full)
        assert reloaded.epoch == 1
