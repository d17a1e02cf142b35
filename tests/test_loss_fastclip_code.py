"""``loss.tau_grad = fastclip_code`` and its sub-options against the published FastCLIP code, in float64.

The reference below is written from reading Optimization-AI/fast_clip (``src/fast_clip/loss.py``:
``FastCLIPLoss.pairwise_loss``, ``.local``, ``.forward``, ``.adjust_gamma``; ``src/training/train.py``:
``train_one_epoch``), not from our loss: K ranks each build the split surrogate (part 1: local anchors vs all
candidates, remote features detached; part 2: all anchors vs the local candidates, normaliser B(KB-1)/KB),
``logit_scale`` (the multiplier exp λ) live in both parts, ``--multiply_tau`` adds ``τ̄·``, ``ρτ`` and
``½τ·mean(log u)``; DDP averages the gradients over the K ranks.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastclip_ds.losses import build_loss
from tests.test_loss_math import features, rel_err

N, D = 8, 5


def published_u(u_old: torch.Tensor, g: torch.Tensor, gamma: float) -> torch.Tensor:
    """``FastCLIPLoss.local``: moving average; when γ < 1 a stored u < 1e-35, inf or NaN is replaced by g."""
    u = (1.0 - gamma) * u_old + gamma * g
    if gamma < 1.0:
        bad = (u_old < 1e-35) | u_old.isinf() | u_old.isnan()
        u = torch.where(bad, g, u)
    return u


def published_gamma(schedule: str, gamma_min: float, decay_epochs: int, epoch: int) -> float:
    """``FastCLIPLoss.adjust_gamma``: 1 in epoch 0 whatever the schedule."""
    if epoch == 0:
        return 1.0
    if epoch >= decay_epochs or schedule != "cosine":
        return gamma_min
    return 0.5 * (1 + math.cos(math.pi * epoch / decay_epochs)) * (1 - gamma_min) + gamma_min


def pairwise(f1, f2, theta, offset):
    """``FastCLIPLoss.pairwise_loss`` (no bounds): row sums of exp(θ(S - s_anchor)) off the diagonal."""
    (i1, t1), (i2, t2) = f1, f2
    b1, b2 = i1.shape[0], i2.shape[0]
    diag = (i1 * t1).sum(-1, keepdim=True)
    e_img = torch.exp((i1 @ t2.T - diag) * theta)
    e_txt = torch.exp((t1 @ i2.T - diag) * theta)
    mask = torch.ones(b1, b2, dtype=i1.dtype)
    if b1 <= b2:
        mask[torch.arange(b1), offset + torch.arange(b1)] = 0
        denom = b2 - 1
    else:
        mask[offset + torch.arange(b2), torch.arange(b2)] = 0
        denom = b2 * (b1 - 1) / b1
    return (e_img * mask).sum(-1) / denom, (e_txt * mask).sum(-1) / denom


def published_step(x, t, lam, u_old, gamma, *, eps, rho, multiply_tau, world):
    """One step of the published code on ``world`` ranks: DDP-averaged gradients of x, t, λ and the new u."""
    x, t, lam = x.clone().requires_grad_(), t.clone().requires_grad_(), lam.clone().requires_grad_()
    theta = lam.exp()
    xs, ts = x.detach(), t.detach()
    b = N // world
    local = []
    for k in range(world):
        rows = slice(k * b, (k + 1) * b)
        g_im, g_tt = pairwise((x[rows], t[rows]), (xs, ts), theta, k * b)
        u_im = published_u(u_old[0][rows], g_im.detach(), gamma)
        u_tt = published_u(u_old[1][rows], g_tt.detach(), gamma)
        local.append((rows, g_im, g_tt, u_im, u_tt))
    remote_u_im = torch.cat([u[3] for u in local])
    remote_u_tt = torch.cat([u[4] for u in local])
    total = 0.0
    for k, (rows, g_im, g_tt, u_im, u_tt) in enumerate(local):
        h_im, h_tt = pairwise((xs, ts), (x[rows], t[rows]), theta, k * b)
        loss = ((g_im / (u_im + eps) + g_tt / (u_tt + eps)).mean()) / 2
        loss = loss + ((h_im / (remote_u_im + eps) + h_tt / (remote_u_tt + eps)).mean()) / 2
        if multiply_tau:
            loss = loss / theta.detach() + rho / theta + (u_im.log() + u_tt.log()).mean() / 2 / theta
        total = total + loss.sum() / world
    total.backward()
    return x.grad, t.grad, lam.grad, (remote_u_im, remote_u_tt)


def ours_step(loss, x, t, lam, keys):
    x, t, lam = x.clone().requires_grad_(), t.clone().requires_grad_(), lam.clone().requires_grad_()
    loss(x, t, lam.exp(), keys)["loss"].backward()
    u = [loss.state.fetch(keys)[:, loss.state.column(c)].exp() for c in ("log_u1", "log_u2")]
    return x.grad, t.grad, lam.grad, u


def make(name: str, **extra):
    cfg = {"name": name, "rho": 1.5, "eps": 1e-3, "gamma": 0.6, "gamma_decay_epochs": 3, **extra}
    return build_loss(cfg, dataset_size=32, steps_per_epoch=4, state_dtype=torch.float64)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("name", ["fastclip_v0", "fastclip_v3"])
def test_fastclip_code_step_equals_published(name: str, world: int) -> None:
    """v0 (no --multiply_tau) and v3 (--multiply_tau): features, λ and u over two steps (epoch 0 first visit,
    epoch 1 with revisited keys) equal the published update. Catches a τ-gradient with the exact ½ on the
    g term or ε inside v3's log, a wrong feature scale, or the exact gradient passed off as the published one."""
    v3 = name == "fastclip_v3"
    loss, exact = make(name), make(name, tau_grad="exact")
    assert loss.multiply_tau == v3
    lam = torch.tensor([math.log(1 / 0.08)], dtype=torch.float64)
    u_old = (torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64))
    keys = torch.arange(N)
    for epoch, seed in ((0, 1), (1, 2)):
        loss.set_epoch(epoch)
        exact.set_epoch(epoch)
        x, t = features(N, D, seed=seed)
        gamma = published_gamma("cosine", 0.6, 3, epoch)
        ref = published_step(x, t, lam, u_old, gamma, eps=1e-3, rho=1.5, multiply_tau=v3, world=world)
        got = ours_step(loss, x, t, lam, keys)
        for a, b in zip(got[:3], ref[:3], strict=True):
            assert rel_err(a, b) < 1e-10
        for a, b in zip(got[3], ref[3], strict=True):
            assert rel_err(a, b) < 1e-12
        u_old = ref[3]
        dlam_exact = ours_step(exact, x, t, lam, keys)[2]
        assert rel_err(dlam_exact, ref[2]) > 0.05  # the two modes really differ in τ
        if not v3:  # v0: the published g term is exactly twice the exact one
            assert rel_err(2 * dlam_exact, ref[2]) < 1e-10


def test_multiply_tau_selects_the_published_feature_scale_alone() -> None:
    """multiply_tau on with tau_grad = exact: the published v3 feature gradient, the exact τ-gradient."""
    lam = torch.tensor([math.log(1 / 0.08)], dtype=torch.float64)
    x, t = features(N, D, seed=1)
    zeros = (torch.zeros(N, dtype=torch.float64),) * 2
    ref = published_step(x, t, lam, zeros, 1.0, eps=1e-3, rho=1.5, multiply_tau=True, world=2)
    mixed = ours_step(make("fastclip_v3", tau_grad="exact", multiply_tau=True), x, t, lam, torch.arange(N))
    exact = ours_step(make("fastclip_v3", tau_grad="exact"), x, t, lam, torch.arange(N))
    assert rel_err(mixed[0], ref[0]) < 1e-10 and rel_err(mixed[1], ref[1]) < 1e-10
    assert rel_err(mixed[2], exact[2]) < 1e-12 and rel_err(mixed[2], ref[2]) > 0.05
    assert rel_err(exact[0], ref[0] / 0.08) < 1e-10  # default exact v3: GCL's feature gradient, ref / τ


@pytest.mark.parametrize(("rule", "second_gamma"), [("one", 1.0), ("auto", 1.0), ("schedule", 0.6)])
def test_gamma_epoch0(rule: str, second_gamma: float) -> None:
    """``FastCLIPLoss.adjust_gamma``: γ = 1 in epoch 0 even for the constant schedule (gamma_epoch0 = one, the
    fastclip_code default); ``schedule`` keeps SogCLR's constant γ_min from the start. A key visited twice in
    epoch 0 shows which: u = g again (γ = 1), or the moving average with γ_min."""
    loss = make("sogclr", gamma=0.6, gamma_epoch0=rule)
    assert published_gamma("constant", 0.6, 3, 0) == 1.0
    lam = torch.tensor([math.log(1 / 0.1)], dtype=torch.float64)
    u_old = (torch.zeros(N, dtype=torch.float64),) * 2
    for step, seed in enumerate((1, 2)):
        x, t = features(N, D, seed=seed)
        gamma = 1.0 if step == 0 else second_gamma  # a first visit sets u = g under every rule
        ref_u = published_step(x, t, lam, u_old, gamma, eps=1e-3, rho=1.5, multiply_tau=False, world=1)[3]
        got_u = ours_step(loss, x, t, lam, torch.arange(N))[3]
        for a, b in zip(got_u, ref_u, strict=True):
            assert rel_err(a, b) < 1e-12
        u_old = ref_u
    assert loss.gamma() == second_gamma
    loss.set_epoch(1)
    assert loss.gamma() == 0.6


@pytest.mark.parametrize("rule", ["tiny", "unseen"])
def test_u_reset(rule: str) -> None:
    """``FastCLIPLoss.local``: with γ < 1, a stored u below 1e-35, +inf or NaN is replaced by g (``tiny``);
    ``unseen`` resets only never-seen keys, so a tiny u is mixed, inf and NaN stay."""
    loss = make("fastclip_v1", u_reset=rule)
    loss.set_epoch(1)
    gamma = loss.gamma()
    assert gamma < 1
    keys = torch.arange(N)
    log_u = torch.tensor([-90.0, math.nan, math.inf, -math.inf, -1.0, 0.5, -80.0, -81.0], dtype=torch.float64)
    loss.state.write(keys, torch.stack([log_u, log_u.flip(0)], dim=1))
    x, t = features(N, D, seed=3)
    lam = torch.tensor([math.log(1 / 0.1)], dtype=torch.float64)
    u_old = (log_u.exp(), log_u.flip(0).exp())  # -80 is above 1e-35, -81 and -90 below
    got_u = ours_step(loss, x, t, lam, keys)[3]
    ref_u = published_step(x, t, lam, u_old, gamma, eps=1e-3, rho=1.5, multiply_tau=False, world=1)[3]
    for a, b, old in zip(got_u, ref_u, u_old, strict=True):
        if rule == "tiny":
            assert rel_err(a, b) < 1e-12
            continue
        kept = (old >= 1e-35) & old.isfinite()
        unseen = old == 0
        assert rel_err(a[kept | unseen], b[kept | unseen]) < 1e-12
        tiny = (old > 0) & (old < 1e-35)
        assert torch.allclose(a[tiny], gamma * b[tiny], rtol=1e-12, atol=0)
        assert a[old.isnan()].isnan().all() and a[old.isposinf()].isposinf().all()
