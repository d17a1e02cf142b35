"""Single-process float64 checks of every loss against dense objectives written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import normalize

from fastclip_ds.compat import import_open_clip
from fastclip_ds.losses import build_loss
from fastclip_ds.losses.fastclip import gamma_at

FASTCLIP = ["sogclr", "isogclr", "fastclip_v0", "fastclip_v1", "fastclip_v2", "fastclip_v3"]
PER_SAMPLE = ("isogclr", "fastclip_v2")
RGCL_G = ("fastclip_v3",)
LEARNT = ("fastclip_v0", "fastclip_v3")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def features(n: int, d: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    t = normalize(x + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(dtype), t.to(dtype)


def dense_g(x, t, theta1, theta2):
    """g1 (image anchors vs texts) and g2 (text anchors vs images), positives excluded; theta [1] or [N]."""
    n = x.shape[0]
    s = x @ t.T
    pos = s.diagonal()
    off = ~torch.eye(n, dtype=torch.bool)
    g1 = (torch.exp(theta1[:, None] * (s - pos[:, None])) * off).sum(1) / (n - 1)
    g2 = (torch.exp(theta2[None, :] * (s - pos[None, :])) * off).sum(0) / (n - 1)
    return g1, g2


def dense_objective(name, x, t, logit_scale, tau1, tau2, u1, u2, eps, rho):
    """F with log(ε+g) replaced by its FCCO estimate log(ε+u) + (g - sg(g))/(ε+u) (u held fixed)."""
    if name in PER_SAMPLE:
        g1, g2 = dense_g(x, t, 1 / tau1, 1 / tau2)
    else:
        theta = logit_scale.exp().expand(x.shape[0])
        g1, g2 = dense_g(x, t, theta, theta)
    l1 = torch.log(eps + u1) + (g1 - g1.detach()) / (eps + u1)
    l2 = torch.log(eps + u2) + (g2 - g2.detach()) / (eps + u2)
    if name in PER_SAMPLE:
        return (0.5 * (tau1 * (l1 + rho) + tau2 * (l2 + rho))).mean()
    tau = torch.exp(-logit_scale[0])
    gcl = (0.5 * (l1 + l2)).mean()
    return tau * gcl + rho * tau if name in RGCL_G else gcl


def make_loss(name, eps=1e-14, rho=0.5, temperature=0.07, n=64, **extra):
    cfg = {"name": name, "eps": eps, "rho": rho, "temperature": temperature, "lr_tau": 0.01, **extra}
    return build_loss(cfg, dataset_size=n, steps_per_epoch=4, state_dtype=torch.float64)


def run_step(loss, x, t, logit_scale, keys):
    x, t = x.clone().requires_grad_(), t.clone().requires_grad_()
    lam = logit_scale.clone().requires_grad_()
    out = loss(x, t, lam, keys)
    out["loss"].backward()
    return out, x.grad, t.grad, lam.grad


def state_of(loss, keys, column):
    return loss.state.fetch(keys)[:, loss.state.column(column)]


def check_step(loss, name, x, t, logit_scale, keys, u_old: dict, gamma: float, eps: float, rho: float) -> dict:
    """One training step of ``loss``; asserts the u update, the gradients and (per-sample τ) the Adam update
    against the dense formulas. ``u_old`` maps key -> (u1, u2) from earlier steps; returns it updated."""
    n = x.shape[0]
    if name in PER_SAMPLE:  # the stored (old) τ drives this step; it was checked when it was written
        tau1, tau2 = state_of(loss, keys, "tau1"), state_of(loss, keys, "tau2")
        moments = {c: state_of(loss, keys, c) for c in ("m1", "m2", "v1", "v2")}
        g1, g2 = dense_g(x, t, 1 / tau1, 1 / tau2)
    else:
        tau1 = tau2 = torch.full((n,), math.nan, dtype=torch.float64)
        theta = logit_scale.exp().expand(n)
        g1, g2 = dense_g(x, t, theta, theta)
    u1, u2 = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    for i, key in enumerate(keys.tolist()):
        same = keys == key  # duplicates: one update per key with the mean g of its occurrences
        new = (g1[same].mean(), g2[same].mean())
        old = u_old.get(key)
        u1[i], u2[i] = (
            new if old is None else ((1 - gamma) * old[0] + gamma * new[0], (1 - gamma) * old[1] + gamma * new[1])
        )

    out, dx, dt, dlam = run_step(loss, x, t, logit_scale, keys)
    assert float(out["gamma"]) == pytest.approx(gamma)
    assert torch.allclose(state_of(loss, keys, "log_u1"), u1.log(), rtol=0, atol=1e-12)
    assert torch.allclose(state_of(loss, keys, "log_u2"), u2.log(), rtol=0, atol=1e-12)

    rx, rt, rlam = x.clone().requires_grad_(), t.clone().requires_grad_(), logit_scale.clone().requires_grad_()
    rtau1, rtau2 = tau1.clone().requires_grad_(), tau2.clone().requires_grad_()
    ref = dense_objective(name, rx, rt, rlam, rtau1, rtau2, u1, u2, eps, rho)
    ref.backward()
    assert rel_err(dx, rx.grad) < 1e-10
    assert rel_err(dt, rt.grad) < 1e-10
    assert float(out["loss"].detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    if name in LEARNT:
        assert rel_err(dlam, rlam.grad) < 1e-10
    else:
        assert dlam is None
    if name in PER_SAMPLE:
        b1, b2 = (0.9, 0.98) if loss.epoch > 0 else (0.0, 0.0)
        steps = loss.epoch + 1
        for side, tau, rtau in (("1", tau1, rtau1), ("2", tau2, rtau2)):
            grad = 2 * n * rtau.grad  # ∂/∂τ_a [τ_a (ℓ_a + ρ)]
            for key in keys.tolist():
                grad[keys == key] = grad[keys == key].mean()
            assert (grad.abs() < 5).sum() >= n // 2  # most entries unclamped: the check sees raw gradients
            grad = grad.clamp(-5, 5)
            m = b1 * moments["m" + side] + (1 - b1) * grad
            v = b2 * moments["v" + side] + (1 - b2) * grad**2
            step = 0.01 * (m / (1 - b1**steps)) / ((v / (1 - b2**steps)).sqrt() + 1e-6)
            assert torch.allclose(state_of(loss, keys, "m" + side), m, rtol=1e-10, atol=1e-14)
            assert torch.allclose(state_of(loss, keys, "v" + side), v, rtol=1e-10, atol=1e-14)
            assert torch.allclose(state_of(loss, keys, "tau" + side), (tau - step).clamp(0.01, 1), rtol=1e-10)
    return u_old | {k: (float(a), float(b)) for k, a, b in zip(keys.tolist(), u1, u2, strict=True)}


@pytest.mark.parametrize("eps", [1e-14, 0.3])
@pytest.mark.parametrize("name", FASTCLIP)
def test_fastclip_gradients_and_u_update(name: str, eps: float) -> None:
    """Step 1: first visit in epoch 0 (γ = 1 for cosine). Step 2, epoch 1 (γ < 1): keys seen before, new keys
    and a key twice. u follows the formula; gradients w.r.t. x, t, logit_scale equal the dense objective's."""
    n, d, rho = 8, 5, 0.5
    schedule = "constant" if name in ("sogclr", "isogclr") else "cosine"
    loss = make_loss(name, eps=eps, rho=rho, gamma=0.6, gamma_schedule=schedule, gamma_decay_epochs=2)
    logit_scale = torch.tensor([math.log(1 / 0.1)], dtype=torch.float64)
    if name in PER_SAMPLE:
        assert torch.equal(state_of(loss, torch.arange(64), "tau1"), torch.full((64,), 0.07, dtype=torch.float64))
    x1, t1 = features(n, d, seed=1)
    u = check_step(
        loss, name, x1, t1, logit_scale, torch.arange(10, 10 + n), {}, 0.6 if schedule == "constant" else 1.0, eps, rho
    )
    loss.set_epoch(1)
    x2, t2 = features(n, d, seed=2)
    keys2 = torch.tensor([14, 31, 15, 16, 30, 31, 17, 32])
    gamma2 = gamma_at(schedule, 0.6, 2, 1)
    assert gamma2 < 1
    check_step(loss, name, x2, t2, logit_scale, keys2, u, gamma2, eps, rho)
