"""Single-process float64 checks of every loss against dense objectives written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import normalize

from fastclip_ds.compat import import_open_clip
from fastclip_ds.losses import build_loss, resolve_config
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
    """The loss with the exact τ-gradient and our γ / u rules (``test_loss_fastclip_code.py`` tests the others)."""
    cfg = {"name": name, "eps": eps, "rho": rho, "temperature": temperature, "lr_tau": 0.01, "tau_grad": "exact"}
    cfg |= extra
    return build_loss(cfg, dataset_size=n, steps_per_epoch=4, state_dtype=torch.float64)


def run_step(loss, x, t, logit_scale, keys):
    """One forward/backward; ``logit_scale`` is the model's parameter λ, the loss gets the multiplier exp(λ)."""
    x, t = x.clone().requires_grad_(), t.clone().requires_grad_()
    lam = logit_scale.clone().requires_grad_()
    out = loss(x, t, lam.exp(), keys)
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
    # the features' gradient is that of the objective divided by τ for RGCL-g without multiply_tau (that of GCL)
    wscale = torch.exp(logit_scale[0]) if name in RGCL_G and not loss.multiply_tau else 1.0
    assert rel_err(dx, rx.grad * wscale) < 1e-10
    assert rel_err(dt, rt.grad * wscale) < 1e-10
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


@pytest.mark.parametrize("name", ["fastclip_v1", "fastclip_v3"])
def test_multiply_tau_scales_only_the_feature_gradients(name: str) -> None:
    """multiply_tau multiplies the features' gradient by τ relative to the default; τ's gradient is unchanged."""
    x, t = features(12, 5, seed=3)
    keys, lam = torch.arange(12), torch.tensor([math.log(1 / 0.07)], dtype=torch.float64)
    grads = {flag: run_step(make_loss(name, multiply_tau=flag), x, t, lam, keys)[1:] for flag in (False, True)}
    (dx0, dt0, dl0), (dx1, dt1, dl1) = grads[False], grads[True]
    assert rel_err(dx1, 0.07 * dx0) < 1e-12 and rel_err(dt1, 0.07 * dt0) < 1e-12
    assert (dl0 is None and dl1 is None) or rel_err(dl1, dl0) < 1e-12


def test_multiply_tau_is_refused_for_per_sample_tau() -> None:
    with pytest.raises(ValueError, match=r"loss\.multiply_tau: only for the global-τ losses"):
        make_loss("fastclip_v2", multiply_tau=True)


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


def test_openclip_matches_open_clip_clip_loss() -> None:
    open_clip = import_open_clip()
    x, t = features(12, 6, seed=3)
    logit_scale = torch.tensor([math.log(1 / 0.07)], dtype=torch.float64)
    out, dx, dt, dlam = run_step(make_loss("openclip"), x, t, logit_scale, torch.arange(12))
    rx, rt, rlam = x.clone().requires_grad_(), t.clone().requires_grad_(), logit_scale.clone().requires_grad_()
    ref = open_clip.loss.ClipLoss()(rx, rt, rlam.exp())
    ref.backward()
    assert float(out["loss"].detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    for ours, theirs in ((dx, rx.grad), (dt, rt.grad), (dlam, rlam.grad)):
        assert rel_err(ours, theirs) < 1e-10


def antipodal_features(n: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives s_ii ≈ -1 and some negatives s_ij ≈ +1: exponents (s_ij - s_ii)/τ ≈ 200 at τ = 0.01."""
    g = torch.Generator().manual_seed(5)
    base = normalize(torch.randn(n // 2, d, generator=g, dtype=torch.float64), dim=1)
    x = torch.stack([base, -base], dim=1).reshape(n, d)
    x = normalize(x + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    t = normalize(-x + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return x.to(dtype), t.to(dtype)


@pytest.mark.parametrize("name", ["openclip", *FASTCLIP])
def test_log_space_stable_at_tau_001(name: str) -> None:
    """float32 at τ = 0.01 with s_ij - s_ii near 2 (e^200 overflows float32): finite, and equal to float64."""
    logit_scale = torch.tensor([math.log(100.0)])
    results = {}
    for dtype in (torch.float32, torch.float64):
        loss = make_loss(name, temperature=0.01, rho=8.0)
        grads = []
        for step in range(2):
            x, t = antipodal_features(8, 6, dtype)
            out, dx, dt, dlam = run_step(loss, x, t, logit_scale.to(dtype), torch.arange(8) + step * 4)
            grads += [out["loss"].detach().reshape(1), dx.flatten(), dt.flatten()]
            grads += [] if dlam is None else [dlam]
            loss.set_epoch(1)
        results[dtype] = torch.cat([g.double() for g in grads])
    assert torch.isfinite(results[torch.float32]).all()
    assert rel_err(results[torch.float32], results[torch.float64]) < 1e-4


def test_gamma_schedules() -> None:
    assert gamma_at("cosine", 0.2, 10, 0) == 1.0
    assert gamma_at("cosine", 0.2, 10, 5) == pytest.approx(0.6)
    assert gamma_at("cosine", 0.2, 10, 10) == gamma_at("cosine", 0.2, 10, 30) == 0.2
    assert gamma_at("constant", 0.2, 10, 0) == 0.2
    epoch_wise = make_loss("fastclip_v1", gamma=0.2, gamma_decay_epochs=4)
    per_step = make_loss("fastclip_v1", gamma=0.2, gamma_decay_epochs=4, gamma_schedule="cosine_step")
    x, t = features(4, 3, seed=0)
    for _ in range(2):  # steps_per_epoch = 4: two steps = half an epoch
        for loss in (epoch_wise, per_step):
            run_step(loss, x, t, torch.zeros(1, dtype=torch.float64), torch.arange(4))
    assert epoch_wise.gamma() == 1.0
    assert per_step.gamma() == pytest.approx(gamma_at("cosine", 0.2, 4, 0.5))
    epoch_wise.set_epoch(2)
    assert epoch_wise.gamma() == pytest.approx(0.6)
    assert make_loss("sogclr", gamma=0.9).gamma() == 0.9


def test_resolve_config_fills_auto() -> None:
    assert resolve_config({"name": "sogclr"})["gamma_schedule"] == "constant"
    assert resolve_config({"name": "fastclip_v1"})["gamma_schedule"] == "cosine"
    assert resolve_config({"name": "fastclip_v3", "tau_scheduler": "auto"})["tau_scheduler"] == "step_thresh"
    assert resolve_config({"name": "openclip", "tau_scheduler": "auto"})["tau_scheduler"] == "cosine"
    assert resolve_config({"name": "openclip", "tau_scheduler": "const"})["tau_scheduler"] == "const"
    # tau_grad picks the published code's sub-options (multiply_tau on for v3 only) or ours
    code = resolve_config({"name": "fastclip_v3"})
    assert (code["tau_grad"], code["multiply_tau"], code["gamma_epoch0"], code["u_reset"]) == (
        "fastclip_code", True, "one", "tiny",
    )  # fmt: skip
    exact = resolve_config({"name": "fastclip_v3", "tau_grad": "exact"})
    assert (exact["multiply_tau"], exact["gamma_epoch0"], exact["u_reset"]) == (False, "schedule", "unseen")
    assert resolve_config({"name": "fastclip_v0"})["multiply_tau"] is False
    assert resolve_config({"name": "fastclip_v3", "multiply_tau": False, "u_reset": "unseen"})["u_reset"] == "unseen"


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "fastclip_v9"}, "loss.name"),
        ({"name": "fastclip_v3", "gama": 0.5}, "loss.gama: unknown key"),
        ({"name": "sogclr", "gamma_schedule": "cosine"}, "loss.gamma_schedule: sogclr uses a constant"),
        ({"name": "fastclip_v1", "gamma": 0.0}, "loss.gamma"),
        ({"name": "fastclip_v2"}, "loss.lr_tau"),
        ({"name": "fastclip_v3", "tau_grad": "paper"}, "loss.tau_grad: 'paper' is not one of exact, fastclip_code"),
        ({"name": "fastclip_v3", "u_reset": "never"}, "loss.u_reset"),
        ({"name": "fastclip_v3", "eps": 0.0}, "loss.eps: must be positive"),
        ({"name": "fastclip_v3", "temperature": 0.005}, r"loss.temperature: 0.005 is outside \[loss.tau_min, 1\]"),
    ],
)
def test_build_loss_rejects_bad_config(cfg: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_loss(cfg, dataset_size=8, steps_per_epoch=1)


def test_key_outside_state_is_a_clear_error() -> None:
    x, t = features(4, 3, seed=0)
    with pytest.raises(ValueError, match=r"key out of range \[0, 64\)"):
        run_step(make_loss("fastclip_v3"), x, t, torch.zeros(1, dtype=torch.float64), torch.tensor([1, 2, 3, 64]))


@pytest.mark.parametrize("name", ["openclip", "fastclip_v2", "fastclip_v3"])
def test_loss_impl_is_passed_to_the_kernels(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel call of forward and backward uses ``loss.impl``; dense and chunked give the same gradients."""
    import fastclip_kernels.dispatch as dispatch

    seen: list[str] = []
    resolve = dispatch.resolve_impl
    monkeypatch.setattr(dispatch, "resolve_impl", lambda impl, x: seen.append(impl) or resolve(impl, x))
    x, t = features(8, 16, seed=4, dtype=torch.float32)
    logit_scale = torch.tensor([math.log(1 / 0.05)])
    grads = {}
    for impl in ("dense", "chunked"):
        seen.clear()
        _, dx, dt, dlam = run_step(make_loss(name, impl=impl), x, t, logit_scale, torch.arange(8))
        assert len(seen) == 4 and set(seen) == {impl}  # two block_stats + two block_grads
        grads[impl] = torch.cat([dx.flatten(), dt.flatten(), torch.zeros(1) if dlam is None else dlam])
    assert rel_err(grads["chunked"], grads["dense"]) < 1e-5
