r"""The FastCLIP family (SogCLR, iSogCLR, FastCLIP v0-v3): compositional losses with per-sample u estimators.

Notation. ``K`` ranks, ``B`` rows per rank, global batch of ``N = K*B`` pairs; image features ``X``, text
features ``T`` (L2-normalised), ``S = X T^T``, ``s_a = S_aa`` the positive of anchor ``a``. Anchor ``a``
has an inverse temperature ``θ1_a = 1/τ1_a`` as an image anchor and ``θ2_a = 1/τ2_a`` as a text anchor
(global-τ variants: ``θ1 = θ2 = exp(logit_scale)``). Positives are excluded from every sum:

    g1_a = 1/(N-1) Σ_{j≠a} exp(θ1_a (S_aj - s_a))       (image anchor a vs texts)
    g2_a = 1/(N-1) Σ_{j≠a} exp(θ2_a (S_ja - s_a))       (text anchor a vs images)

Objectives (the ½ averages the two directions, so values are on OpenCLIP's scale):

    GCL    (sogclr, fastclip_v0, fastclip_v1):  F = mean_a ½ [ℓ1_a + ℓ2_a]
    RGCL-g (fastclip_v3):                      F = τ mean_a ½ [ℓ1_a + ℓ2_a] + ρτ
    RGCL-i (isogclr, fastclip_v2):             F = mean_a ½ [τ1_a (ℓ1_a + ρ) + τ2_a (ℓ2_a + ρ)]

with ``ℓ = log(ε + g)``. GCL is the paper's GCL divided by τ (the public code's un-τ-scaled surrogate for
v0/v1); RGCL-g and RGCL-i are the paper's objectives halved.

Estimator u (per sample, per direction, stored as ``log u`` in the sharded state, see ``state.py``):
``log u ← logaddexp(log(1-γ) + log u, log γ + log g)``; a key never seen (``log u = -inf``) gets ``u = g``.
FCCO gradient: ``∇ℓ ≈ ∇g / (ε + u)`` with the UPDATED u held fixed; everywhere ``log(ε + u) =
logaddexp(log ε, log u)``, so nothing overflows at τ = 0.01. Equivalently the gradient is that of F with
``ℓ`` replaced by ``log(ε+u) + (g - sg(g)) / (ε+u)`` (``sg`` = stop-gradient), which is what the tests
differentiate densely. Per anchor term the weight of a negative is

    w_aj = α_a θ_a exp(θ_a S_aj - b_a),    b_a = θ_a s_a + log(ε + u_a) + log(N-1)

with ``α_a = 1/(2N)`` (GCL), ``sg(τ)/(2N)`` (RGCL-g: the surrogate times a detached τ, i.e. the exact
RGCL-g w-gradient; see ``multiply_tau`` below) or ``τ_a/(2N)`` (RGCL-i: the EXACT RGCL w-gradient; the
public v2 code lacks the τ_a factor, i.e. has an extra 1/τ_a per anchor; we do not reproduce that). The
positive ``s_a`` gets ``-Σ_j w_aj = -α_a θ_a g_a/(ε+u_a)``.

Temperatures.
    * v0: ``logit_scale`` learnt with the autograd gradient of the GCL surrogate (OpenCLIP style, no ρ).
    * v3: ``logit_scale`` learnt with the exact RGCL-g τ-gradient
      ``∂F/∂τ = mean_a ½[log(ε+u1_a) + log(ε+u2_a)] + τ mean_a ½[(∂g1_a/∂τ)/(ε+u1_a) + (∂g2_a/∂τ)/(ε+u2_a)] + ρ``
      (ε inside the log, unlike the public code's ``log u``: it is the derivative of F as written and
      cannot be -inf).
    * sogclr, v1: global τ = ``exp(-logit_scale)`` frozen.
    * isogclr, v2: per-sample τ1_a, τ2_a (``logit_scale`` unused), updated after the step by per-sample
      Adam on ``G_a = ∂/∂τ_a [τ_a (ℓ_a + ρ)] = log(ε+u_a) + ρ - θ_a (g_a/(ε+u_a)) (m_a - s_a)`` (``m_a`` the
      softmax mean of the anchor's row, so ``τ ∂g/∂τ = -θ g (m - s)``), clamped to ±5, betas 0 in epoch 0
      and bias correction with ``epoch + 1`` steps (one visit per sample per epoch), lr ``lr_tau``, result
      clamped to ``[τ_min, 1]``. The step uses the OLD τ; the new one is stored for the next visit.
      iSogCLR uses this same rule with a constant γ (as FastCLIP's comparison; the original iSogCLR code
      used momentum SGD on τ).

Inner learning rate γ: ``constant`` (γ_min), ``cosine`` (``γ_e = γ_min + (1-γ_min)·½(1+cos(π e/E))`` for
epoch ``e < E``, γ_min after; γ = 1 in epoch 0, as the paper) and ``cosine_step`` (the same with the
fractional epoch ``steps / steps_per_epoch``). sogclr/isogclr are constant-γ by definition.

Distributed estimator (no feature gradient ever crosses the network). Rank ``r`` owns rows
``[rB, (r+1)B)``. Per step:
    C1  one all-gather of ``[x | t | key]`` (keys byte-packed into the same buffer), no autograd;
    C2  one all-reduce of the ``[N, S]`` old state of the global keys (owners fill, others zero);
        local rows' ``block_stats`` (S1 = x T^T image anchors, S2 = t X^T text anchors) give log g_a
        (and ``θ_a (m_a - s_a)`` for per-sample τ);
    C3  one all-gather of those per-anchor values. Every rank then computes the updated u (and τ) of all
        N anchors identically and the owners write their keys back.
Rank r's features receive the gradient from EVERY anchor of the global batch: block S1 with row
coefficients of its local image anchors and column coefficients of all N text anchors gives d x, block S2
symmetrically gives d t (one ``block_grads`` each). The surrogate of rank r is scaled by K, so DeepSpeed's
average over ranks of the parameter gradients is the exact global gradient; the τ-gradient comes only
from the local anchors' rows (``∂/∂θ Σ_j exp(θ S_aj - b_a) = exp(lse_a - b_a)(m_a - s_a)`` with ``b_a``
depending on θ through ``θ s_a``), so nothing is counted twice. Per rank, a negative (a, j) therefore
carries ``K α_a θ_a exp(θ_a d_aj) / ((N-1)(ε+u_a))``; for GCL that is ``θ exp(θ d_aj) / (2 B (N-1)(ε+u_a))``,
the public code's part-2 normaliser ``B (KB-1)/KB`` applied after its mean over the KB anchors, times ½.

Duplicate keys in one global batch: every occurrence is its own anchor (its own g, its copies are
ordinary negatives of each other, as in the public code), but the state update is per KEY: g is averaged
over the occurrences in log space (log-mean-exp), all occurrences get the same new u, and v2's τ-gradient is
averaged over them before the single Adam step.

``multiply_tau`` (global-τ losses only) sets the scale of the FEATURES' gradient: on, that of τ·GCL (the
public code's ``--multiply_tau``, the exact RGCL-g w-gradient); off (default), that of GCL, i.e. the RGCL-g
w-gradient divided by τ for fastclip_v3. For a fixed τ both have the same minimiser in w, and an Adam-type
optimizer would not care about the constant factor but for its ε: with OpenCLIP's ViT setting ε = 1e-6, the
τ ≈ 0.07 factor damps the small-gradient parameters, and fastclip_v3 on the digits demo reached 0.39
zero-shot top-1 with it against 0.85 for fastclip_v1. τ's own gradient is the exact RGCL-g one either way.

``loss`` (what to backpropagate) has the value of rank r's local objective estimate with u in place of g;
``objective`` is the global-batch value of F with the batch g (identical on all ranks).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from fastclip_kernels import block_grads, block_stats
from torch import Tensor

from .. import comm
from .base import ContrastiveLoss
from .state import ShardedState

OBJECTIVE = {
    "sogclr": "gcl",
    "fastclip_v0": "gcl",
    "fastclip_v1": "gcl",
    "fastclip_v3": "rgcl_g",
    "isogclr": "rgcl_i",
    "fastclip_v2": "rgcl_i",
}
LEARNS_LOGIT_SCALE = ("fastclip_v0", "fastclip_v3")
CONSTANT_GAMMA = ("sogclr", "isogclr")
GAMMA_SCHEDULES = ("constant", "cosine", "cosine_step")
TAU_GRAD_CLAMP = 5.0
TAU_MAX = 1.0


def gamma_at(schedule: str, gamma_min: float, decay_epochs: float, epoch: float) -> float:
    """The inner learning rate at a (possibly fractional) epoch."""
    if schedule == "constant" or epoch >= decay_epochs:
        return gamma_min
    return gamma_min + (1.0 - gamma_min) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))


def log_mean_by_group(values: Tensor, group: Tensor, groups: int) -> Tensor:
    """``[groups, C]``: log of the mean of ``exp(values)`` over the rows of each group."""
    cols = values.shape[1]
    top = values.new_full((groups, cols), -math.inf)
    top.scatter_reduce_(0, group[:, None].expand(-1, cols), values, "amax")
    total = values.new_zeros((groups, cols)).index_add_(0, group, torch.exp(values - top[group]))
    count = torch.bincount(group, minlength=groups).to(values.dtype)
    return top + torch.log(total) - torch.log(count)[:, None]


class _Anchors(NamedTuple):
    """One direction's constants. ``theta``/``b``/``alpha``: all N anchors (or one broadcast value);
    ``ratio`` = g/(ε+u) and ``mom`` (row softmax mean): local anchors only."""

    theta: Tensor
    b: Tensor
    alpha: Tensor
    ratio: Tensor
    mom: Tensor


def _local(v: Tensor, rows: slice) -> Tensor:
    return v if v.numel() == 1 else v[rows]


class _FccoSurrogate(torch.autograd.Function):
    """Value ``scale Σ_{local a} α_a (g1_a/(ε+u1_a) + g2_a/(ε+u2_a))``; backward = the FCCO gradient of this
    rank's features from all N anchors, and of ``logit_scale`` from the local anchors (see module doc)."""

    @staticmethod
    def forward(ctx, x, t, logit_scale, xs, ts, img, txt, spos, offset, scale, feature_scale, impl):
        rows = slice(offset, offset + x.shape[0])
        ctx.save_for_backward(x, t)
        ctx.consts = (xs, ts, img, txt, spos, rows, scale, feature_scale, impl)
        value = _local(img.alpha, rows) * img.ratio + _local(txt.alpha, rows) * txt.ratio
        return scale * value.sum()

    @staticmethod
    def backward(ctx, grad):
        x, t = ctx.saved_tensors
        xs, ts, img, txt, spos, rows, scale, feature_scale, impl = ctx.consts
        k = grad.to(spos.dtype) * scale
        kf = k * feature_scale  # the features' gradient scale (see ``multiply_tau``); τ's uses k

        def coeffs(side: _Anchors, local: bool) -> tuple[Tensor, Tensor, Tensor]:
            pick = (lambda v: _local(v, rows)) if local else (lambda v: v)
            return pick(side.theta), pick(side.b), pick(side.alpha) * kf

        off = rows.start
        dx = block_grads(x, ts, coeffs(img, True), coeffs(txt, False), off, True, impl=impl, need_dy=False)[0]
        dt = block_grads(t, xs, coeffs(txt, True), coeffs(img, False), off, True, impl=impl, need_dy=False)[0]
        w_img = _local(img.alpha, rows) * _local(img.theta, rows) * img.ratio
        w_txt = _local(txt.alpha, rows) * _local(txt.theta, rows) * txt.ratio
        diag = -(w_img + w_txt) * kf
        dx = dx + (diag[:, None] * t.to(diag.dtype)).to(x.dtype)
        dt = dt + (diag[:, None] * x.to(diag.dtype)).to(t.dtype)
        dscale = None
        if ctx.needs_input_grad[2]:
            dtheta = (_local(img.alpha, rows) * img.ratio * (img.mom - spos)).sum()
            dtheta = dtheta + (_local(txt.alpha, rows) * txt.ratio * (txt.mom - spos)).sum()
            dscale = (img.theta * dtheta * k).reshape(1)
        return dx, dt, dscale, None, None, None, None, None, None, None, None, None


class FastClipLoss(ContrastiveLoss):
    """``loss.name`` in ``OBJECTIVE``; see the module docstring for every formula and factor."""

    def __init__(
        self,
        name: str,
        *,
        dataset_size: int,
        steps_per_epoch: int,
        gamma: float,
        gamma_schedule: str,
        gamma_decay_epochs: float,
        rho: float,
        eps: float,
        multiply_tau: bool,
        temperature: float,
        tau_min: float,
        lr_tau: float | None,
        tau_beta1: float,
        tau_beta2: float,
        tau_eps: float,
        impl: str = "auto",
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if name not in OBJECTIVE:
            raise ValueError(f"loss.name: {name!r} is not a FastCLIP-family loss ({', '.join(OBJECTIVE)})")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"loss.gamma: must be in (0, 1] (got {gamma})")
        if gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"loss.gamma_schedule: {gamma_schedule!r} is not one of {GAMMA_SCHEDULES}")
        if name in CONSTANT_GAMMA and gamma_schedule != "constant":
            raise ValueError(f"loss.gamma_schedule: {name} uses a constant γ (got {gamma_schedule!r})")
        if eps <= 0.0:
            raise ValueError(f"loss.eps: must be > 0 (got {eps})")
        self.name, self.objective = name, OBJECTIVE[name]
        self.per_sample = self.objective == "rgcl_i"
        if self.per_sample and lr_tau is None:
            raise ValueError(f"loss.lr_tau: {name} updates per-sample τ inside the loss; set it (or pass the model lr)")
        if self.per_sample and multiply_tau:
            raise ValueError(f"loss.multiply_tau: only for the global-τ losses, not {name}")
        self.trains_logit_scale = name in LEARNS_LOGIT_SCALE
        self.key_limit = dataset_size
        self.multiply_tau = multiply_tau
        self.steps_per_epoch = steps_per_epoch
        self.gamma_min, self.gamma_schedule, self.gamma_decay_epochs = gamma, gamma_schedule, gamma_decay_epochs
        self.rho, self.eps, self.tau_min, self.lr_tau = rho, eps, tau_min, lr_tau
        self.tau_beta1, self.tau_beta2, self.tau_eps = tau_beta1, tau_beta2, tau_eps
        self.impl = impl
        self.epoch, self.steps_seen = 0, 0
        self._staged: tuple[Tensor, Tensor] | None = None
        init = {"log_u1": -math.inf, "log_u2": -math.inf}
        if self.per_sample:
            init |= {"tau1": temperature, "tau2": temperature, "m1": 0.0, "m2": 0.0, "v1": 0.0, "v2": 0.0}
        self.state = ShardedState(dataset_size, init, rank=comm.rank(), world=comm.world_size(), dtype=state_dtype)

    # -- schedules and checkpoints --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def gamma(self) -> float:
        if self.gamma_schedule == "cosine_step":
            return gamma_at("cosine", self.gamma_min, self.gamma_decay_epochs, self.steps_seen / self.steps_per_epoch)
        return gamma_at(self.gamma_schedule, self.gamma_min, self.gamma_decay_epochs, self.epoch)

    def commit(self) -> None:
        if self._staged is not None:
            self.state.write(*self._staged)
            self.steps_seen += 1
            self._staged = None

    def discard(self) -> None:
        self._staged = None

    def save_state(self, directory: Path) -> None:
        self.state.save(directory, {"epoch": self.epoch, "steps_seen": self.steps_seen})

    def load_state(self, directory: Path) -> None:
        meta = self.state.load(directory)
        self.epoch, self.steps_seen = meta["epoch"], meta["steps_seen"]

    # -- the step ---------------------------------------------------------------------------------------
    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, keys: Tensor) -> dict:
        x, t = image_features, text_features
        world, rank = comm.world_size(), comm.rank()
        if (world, rank) != (self.state.world, self.state.rank):
            raise RuntimeError(
                f"{self.name}: built for rank {self.state.rank}/{self.state.world}, run at {rank}/{world}"
            )
        b = x.shape[0]
        n = world * b
        if n < 2:
            raise ValueError(f"{self.name}: the global batch must hold at least 2 samples (got {n})")
        rows = slice(rank * b, (rank + 1) * b)
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        xs, ts, gkeys = comm.all_gather_rows([x, t, keys.to(torch.int64)], op="fastclip_features")
        old = comm.all_reduce_sum_(self.state.fetch(gkeys), op="fastclip_state").to(cd)
        spos = (xs.to(cd) * ts.to(cd)).sum(1)
        lam = logit_scale.to(cd) if self.trains_logit_scale else logit_scale.detach().to(cd)
        if self.per_sample:
            tau1, tau2 = old[:, self.state.column("tau1")], old[:, self.state.column("tau2")]
            th1, th2 = 1.0 / tau1, 1.0 / tau2
        else:
            th1 = th2 = lam.detach().exp().reshape(1)

        # local anchors' rows: log g and (per-sample τ) θ (m - s)
        log_n1 = math.log(n - 1)
        st1 = block_stats(x, ts, _local(th1, rows), None, rows.start, True, impl=self.impl)
        st2 = block_stats(t, xs, _local(th2, rows), None, rows.start, True, impl=self.impl)
        lg_loc = torch.stack(
            [
                st1.lse_row.to(cd) - _local(th1, rows) * spos[rows] - log_n1,
                st2.lse_row.to(cd) - _local(th2, rows) * spos[rows] - log_n1,
            ],
            dim=1,
        )
        send = [lg_loc]
        if self.per_sample:
            c_loc = torch.stack([th1[rows] * (st1.mom_row - spos[rows]), th2[rows] * (st2.mom_row - spos[rows])], 1)
            send.append(c_loc)
        gathered = comm.all_gather_rows(send, op="fastclip_g")
        lg = gathered[0]

        # u update per key (duplicates merged), identical on every rank
        uniq, group = torch.unique(gkeys, return_inverse=True)
        lg_key = log_mean_by_group(lg, group, uniq.numel())[group]
        lu_old = old[:, :2]
        gamma = self.gamma()
        log_1mg = math.log1p(-gamma) if gamma < 1.0 else -math.inf
        mixed = torch.logaddexp(lu_old + log_1mg, lg_key + math.log(gamma))
        lu = torch.where(torch.isneginf(lu_old), lg_key, mixed)
        leu = torch.logaddexp(torch.full_like(lu, math.log(self.eps)), lu)
        ratio = torch.exp(lg - leu)

        new_state = [lu]
        if self.per_sample:
            new_state.append(self._tau_step(old, leu, ratio, gathered[1], group, uniq.numel()))
        if self.training:
            self._staged = (gkeys, torch.cat(new_state, dim=1))
            if not self.defer_updates:
                self.commit()

        # the surrogate
        if self.objective == "gcl":
            alpha1 = alpha2 = torch.full((1,), 0.5 / n, dtype=cd, device=x.device)
        elif self.objective == "rgcl_g":
            alpha1 = alpha2 = torch.exp(-lam.detach()).reshape(1) * (0.5 / n)
        else:
            alpha1, alpha2 = tau1 * (0.5 / n), tau2 * (0.5 / n)
        img = _Anchors(th1, th1 * spos + leu[:, 0] + log_n1, alpha1, ratio[rows, 0], st1.mom_row.to(cd))
        txt = _Anchors(th2, th2 * spos + leu[:, 1] + log_n1, alpha2, ratio[rows, 1], st2.mom_row.to(cd))
        fcco = _FccoSurrogate.apply(
            x, t, lam, xs, ts, img, txt, spos[rows], rows.start, float(world), self.feature_scale(lam), self.impl
        )

        leg = torch.logaddexp(torch.full_like(lg, math.log(self.eps)), lg)
        if self.objective == "rgcl_i":
            local_value = 0.5 * (tau1[rows] * (leu[rows, 0] + self.rho) + tau2[rows] * (leu[rows, 1] + self.rho))
            objective = 0.5 * (tau1 * (leg[:, 0] + self.rho) + tau2 * (leg[:, 1] + self.rho))
            tau_metric = 0.5 * (tau1.mean() + tau2.mean())
        else:
            tau = torch.exp(-lam).reshape(())
            local_value = 0.5 * leu[rows].sum(1)
            objective = 0.5 * leg.sum(1)
            if self.objective == "rgcl_g":
                local_value, objective = tau * local_value + self.rho * tau, tau * objective + self.rho * tau
            tau_metric = tau
        local_value = local_value.mean()
        loss = fcco - fcco.detach() + local_value
        return {
            "loss": loss,
            "objective": objective.mean().detach(),
            "tau": tau_metric.detach(),
            "gamma": torch.tensor(gamma),
        }

    def feature_scale(self, lam: Tensor) -> Tensor | float:
        """Factor on the features' gradient relative to the objective's: ``multiply_tau`` gives every global-τ
        loss the w-gradient of τ·GCL (exact for RGCL-g), off gives that of GCL (exact for sogclr/v0/v1)."""
        if self.per_sample or self.multiply_tau == (self.objective == "rgcl_g"):
            return 1.0
        tau = torch.exp(-lam.detach()).reshape(())
        return tau if self.multiply_tau else 1.0 / tau

    def _tau_step(self, old: Tensor, leu: Tensor, ratio: Tensor, c: Tensor, group: Tensor, groups: int) -> Tensor:
        """Per-sample Adam on τ (module doc); returns the new ``[tau1, tau2, m1, m2, v1, v2]`` columns."""
        grad = leu + self.rho - ratio * c
        count = torch.bincount(group, minlength=groups).to(grad.dtype)[:, None]
        grad = (grad.new_zeros((groups, 2)).index_add_(0, group, grad) / count)[group]
        grad = grad.clamp(-TAU_GRAD_CLAMP, TAU_GRAD_CLAMP)
        col = self.state.column
        tau = old[:, [col("tau1"), col("tau2")]]
        m, v = old[:, [col("m1"), col("m2")]], old[:, [col("v1"), col("v2")]]
        beta1, beta2 = (self.tau_beta1, self.tau_beta2) if self.epoch > 0 else (0.0, 0.0)
        m = beta1 * m + (1.0 - beta1) * grad
        v = beta2 * v + (1.0 - beta2) * grad * grad
        steps = self.epoch + 1
        m_hat, v_hat = m / (1.0 - beta1**steps), v / (1.0 - beta2**steps)
        tau = (tau - self.lr_tau * m_hat / (v_hat.sqrt() + self.tau_eps)).clamp(self.tau_min, TAU_MAX)
        return torch.cat([tau, m, v], dim=1)
