r"""The FastCLIP family (SogCLR, iSogCLR, FastCLIP v0-v3): compositional losses with per-sample u estimators.

Notation. ``K`` ranks, ``B`` rows per rank, global batch of ``N = K*B`` pairs; image features ``X``, text
features ``T`` (L2-normalised), ``S = X T^T``, ``s_a = S_aa`` the positive of anchor ``a``. Anchor ``a``
has an inverse temperature ``θ1_a = 1/τ1_a`` as an image anchor and ``θ2_a = 1/τ2_a`` as a text anchor
(global-τ variants: ``θ1 = θ2 = θ``, the ``logit_scale`` multiplier the model returns, ``exp`` of its
parameter, as open_clip's ``ClipLoss`` takes it). Positives are excluded from every sum:

    g1_a = 1/(N-1) Σ_{j≠a} exp(θ1_a (S_aj - s_a))       (image anchor a vs texts)
    g2_a = 1/(N-1) Σ_{j≠a} exp(θ2_a (S_ja - s_a))       (text anchor a vs images)

Objectives (the ½ averages the two directions, so values are on OpenCLIP's scale):

    GCL    (sogclr, fastclip_v0, fastclip_v1):  F = mean_a ½ [ℓ1_a + ℓ2_a]
    RGCL-g (fastclip_v3):                      F = τ mean_a ½ [ℓ1_a + ℓ2_a] + ρτ
    RGCL-i (isogclr, fastclip_v2):             F = mean_a ½ [τ1_a (ℓ1_a + ρ) + τ2_a (ℓ2_a + ρ)]

with ``ℓ = log(ε + g)``. GCL is the paper's GCL divided by τ (the public code's un-τ-scaled surrogate for
v0/v1); RGCL-g and RGCL-i are the paper's objectives halved.

Estimator u (per sample, per direction, stored as ``log u`` in the sharded state, see ``state.py``):
``log u ← logaddexp(log(1-γ) + log u, log γ + log g)``; a key never seen (``log u = -inf``) gets ``u = g``,
and with ``u_reset = tiny`` (the public code) so does a stored u below 1e-35, infinite or NaN when γ < 1.
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
    * v0 and v3 learn θ. ``tau_grad = exact``: θ's gradient is that of F (v3: the exact RGCL-g τ-gradient
      ``∂F/∂τ = mean_a ½[log(ε+u1_a) + log(ε+u2_a)] + τ mean_a ½[(∂g1_a/∂τ)/(ε+u1_a) + (∂g2_a/∂τ)/(ε+u2_a)]
      + ρ``). ``tau_grad = fastclip_code`` (the published code, whose split surrogate keeps θ live in both
      of its halves): the g term counts twice, ``τ mean_a[(∂g1_a/∂τ)/(ε+u1_a) + (∂g2_a/∂τ)/(ε+u2_a)]``,
      and v3's log term is ``½ mean_a[log u1_a + log u2_a]`` (no ε). So the published ρ balances a larger
      term: at equal ρ its τ settles lower.
    * sogclr, v1: global τ = ``1/θ`` frozen.
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
``gamma_epoch0 = one`` (the public code) sets γ = 1 for all of epoch 0 whatever the schedule.

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
average over ranks of the parameter gradients is the exact global gradient; the θ-gradient comes only
from the local anchors' rows (``∂/∂θ Σ_j exp(θ S_aj - b_a) = exp(lse_a - b_a)(m_a - s_a)`` with ``b_a``
depending on θ through ``θ s_a``), so nothing is counted twice. Per rank, a negative (a, j) therefore
carries ``K α_a θ_a exp(θ_a d_aj) / ((N-1)(ε+u_a))``; for GCL that is ``θ exp(θ d_aj) / (2 B (N-1)(ε+u_a))``,
the public code's part-2 normaliser ``B (KB-1)/KB`` applied after its mean over the KB anchors, times ½.

Duplicate keys in one global batch: every occurrence is its own anchor (its own g, its copies are
ordinary negatives of each other, as in the public code), but the state update is per KEY: g is averaged
over the occurrences in log space (log-mean-exp), all occurrences get the same new u, and v2's τ-gradient is
averaged over them before the single Adam step (the public code: the last write wins).

``multiply_tau`` (global-τ losses only) sets the scale of the FEATURES' gradient: on, that of τ·GCL (the
public code's ``--multiply_tau``, the exact RGCL-g w-gradient); off, that of GCL, i.e. the RGCL-g
w-gradient divided by τ for fastclip_v3. For a fixed τ both have the same minimiser in w, and an Adam-type
optimizer would not care about the constant factor but for its ε: with OpenCLIP's ViT setting ε = 1e-6, the
τ ≈ 0.07 factor damps the small-gradient parameters (docs/RESULTS.md §1). θ's own gradient is set by
``tau_grad`` alone.

``loss`` (what to backpropagate) has the value of rank r's local objective estimate with u in place of g
(fastclip_code v3: ``log u`` in τ's term); ``objective`` is the global-batch value of F with the batch g
(identical on all ranks).
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
from .settings import OBJECTIVE, LossSettings
from .state import ShardedState

TAU_GRAD_CLAMP = 5.0
TAU_MAX = 1.0
LOG_U_TINY = math.log(1e-35)  # u_reset = tiny: the public code's threshold


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


def _local(v: Tensor, rows: slice) -> Tensor:
    return v if v.numel() == 1 else v[rows]


class _Batch(NamedTuple):
    """The global batch as every rank sees it after C1 and C2 (``old``: the keys' state rows before the step)."""

    xs: Tensor
    ts: Tensor
    keys: Tensor
    old: Tensor
    spos: Tensor
    rows: slice


class _Estimate(NamedTuple):
    """After C3, per global anchor and direction ``[N, 2]``: batch ``log g``, updated ``log u``,
    ``log(ε+u)`` and ``ratio = g/(ε+u)``; ``new_state`` the rows to write back."""

    lg: Tensor
    lu: Tensor
    leu: Tensor
    ratio: Tensor
    gamma: float
    new_state: Tensor


class _Anchors(NamedTuple):
    """One direction's constants. ``theta``/``b``/``alpha``: all N anchors (or one broadcast value);
    ``ratio`` = g/(ε+u) and ``mom`` (row softmax mean): local anchors only."""

    theta: Tensor
    b: Tensor
    alpha: Tensor
    ratio: Tensor
    mom: Tensor


class _Block(NamedTuple):
    """What the surrogate's backward needs besides the differentiable inputs. ``scale`` = K; ``feature_scale``
    multiplies the features' gradient (``multiply_tau``), ``theta_scale`` θ's (2 under ``fastclip_code``)."""

    xs: Tensor
    ts: Tensor
    img: _Anchors
    txt: _Anchors
    spos: Tensor
    rows: slice
    scale: float
    feature_scale: Tensor | float
    theta_scale: float
    impl: str


class _FccoSurrogate(torch.autograd.Function):
    """Value ``scale Σ_{local a} α_a (g1_a/(ε+u1_a) + g2_a/(ε+u2_a))``; backward = the FCCO gradient of this
    rank's features from all N anchors, and of θ from the local anchors (see module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, theta: Tensor, blk: _Block) -> Tensor:
        ctx.save_for_backward(x, t)
        ctx.blk = blk
        img, txt, rows = blk.img, blk.txt, blk.rows
        return blk.scale * (_local(img.alpha, rows) * img.ratio + _local(txt.alpha, rows) * txt.ratio).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, t = ctx.saved_tensors
        blk = ctx.blk
        rows, off = blk.rows, blk.rows.start
        k = grad.to(blk.spos.dtype) * blk.scale
        kf = k * blk.feature_scale

        def coeffs(side: _Anchors, local: bool) -> tuple[Tensor, Tensor, Tensor]:
            pick = (lambda v: _local(v, rows)) if local else (lambda v: v)
            return pick(side.theta), pick(side.b), pick(side.alpha) * kf

        dx = block_grads(
            x, blk.ts, coeffs(blk.img, True), coeffs(blk.txt, False), off, True, impl=blk.impl, need_dy=False
        )
        dt = block_grads(
            t, blk.xs, coeffs(blk.txt, True), coeffs(blk.img, False), off, True, impl=blk.impl, need_dy=False
        )
        weighted = [_local(s.alpha, rows) * s.ratio for s in (blk.img, blk.txt)]  # α_a g_a/(ε+u_a)
        diag = -(weighted[0] * _local(blk.img.theta, rows) + weighted[1] * _local(blk.txt.theta, rows)) * kf
        dx = dx[0] + (diag[:, None] * t.to(diag.dtype)).to(x.dtype)
        dt = dt[0] + (diag[:, None] * x.to(diag.dtype)).to(t.dtype)
        dtheta = None
        if ctx.needs_input_grad[2]:
            slope = sum(w * (s.mom - blk.spos) for w, s in zip(weighted, (blk.img, blk.txt), strict=True))
            dtheta = (slope.sum() * k * blk.theta_scale).reshape(1)
        return dx, dt, dtheta, None


class FastClipLoss(ContrastiveLoss):
    """``settings.name`` in ``OBJECTIVE``; see the module docstring for every formula and factor."""

    def __init__(
        self,
        settings: LossSettings,
        *,
        dataset_size: int,
        steps_per_epoch: int,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if settings.name not in OBJECTIVE:
            raise ValueError(f"loss.name: {settings.name!r} is not a FastCLIP-family loss ({', '.join(OBJECTIVE)})")
        if settings.per_sample and settings.lr_tau is None:
            raise ValueError(f"loss.lr_tau: {settings.name} updates per-sample τ inside the loss; set it")
        self.settings, self.name = settings, settings.name
        self.objective, self.per_sample = settings.objective, settings.per_sample
        self.trains_logit_scale = settings.learns_logit_scale
        self.multiply_tau = bool(settings.multiply_tau)
        self.key_limit = dataset_size
        self.steps_per_epoch = steps_per_epoch
        self.epoch, self.steps_seen = 0, 0
        self._staged: tuple[Tensor, Tensor] | None = None
        init = {"log_u1": -math.inf, "log_u2": -math.inf}
        if self.per_sample:
            tau0 = settings.temperature
            init |= {"tau1": tau0, "tau2": tau0, "m1": 0.0, "m2": 0.0, "v1": 0.0, "v2": 0.0}
        self.state = ShardedState(dataset_size, init, rank=comm.rank(), world=comm.world_size(), dtype=state_dtype)

    # -- schedules and checkpoints --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def gamma(self) -> float:
        s = self.settings
        if s.gamma_epoch0 == "one" and self.epoch == 0:
            return 1.0
        if s.gamma_schedule == "cosine_step":
            return gamma_at("cosine", s.gamma, s.gamma_decay_epochs, self.steps_seen / self.steps_per_epoch)
        return gamma_at(s.gamma_schedule, s.gamma, s.gamma_decay_epochs, self.epoch)

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

    # -- the step: gather -> estimate u -> surrogate ---------------------------------------------------
    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, keys: Tensor) -> dict:
        x, t = image_features, text_features
        batch = self._gather(x, t, keys)
        theta = logit_scale.reshape(1).to(batch.spos.dtype)
        if not self.trains_logit_scale:
            theta = theta.detach()
        th1, th2 = self._inverse_temperatures(batch, theta)
        impl, rows = self.settings.impl, batch.rows
        st1 = block_stats(x, batch.ts, _local(th1, rows), None, rows.start, True, impl=impl)
        st2 = block_stats(t, batch.xs, _local(th2, rows), None, rows.start, True, impl=impl)
        mom = [st1.mom_row.to(batch.spos.dtype), st2.mom_row.to(batch.spos.dtype)]
        est = self._estimate_u(batch, [st1.lse_row, st2.lse_row], mom, (th1, th2))
        if self.training:
            self._staged = (batch.keys, est.new_state)
            if not self.defer_updates:
                self.commit()
        fcco = self._surrogate(x, t, theta, batch, est, mom, (th1, th2))
        return self._outputs(fcco, theta, batch, est)

    def _gather(self, x: Tensor, t: Tensor, keys: Tensor) -> _Batch:
        """C1 (features and keys) and C2 (the keys' state rows)."""
        world, rank = comm.world_size(), comm.rank()
        if (world, rank) != (self.state.world, self.state.rank):
            raise RuntimeError(
                f"{self.name}: built for rank {self.state.rank}/{self.state.world}, run at {rank}/{world}"
            )
        b = x.shape[0]
        if world * b < 2:
            raise ValueError(f"{self.name}: the global batch must hold at least 2 samples (got {world * b})")
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        xs, ts, gkeys = comm.all_gather_rows([x, t, keys.to(torch.int64)], op="fastclip_features")
        old = comm.all_reduce_sum_(self.state.fetch(gkeys), op="fastclip_state").to(cd)
        spos = (xs.to(cd) * ts.to(cd)).sum(1)
        return _Batch(xs, ts, gkeys, old, spos, slice(rank * b, (rank + 1) * b))

    def _inverse_temperatures(self, batch: _Batch, theta: Tensor) -> tuple[Tensor, Tensor]:
        """θ1, θ2: ``[N]`` from the stored per-sample τ, else the detached global θ ``[1]``."""
        if self.per_sample:
            col = self.state.column
            return 1.0 / batch.old[:, col("tau1")], 1.0 / batch.old[:, col("tau2")]
        return theta.detach(), theta.detach()

    def _estimate_u(
        self, batch: _Batch, lse: list[Tensor], mom: list[Tensor], thetas: tuple[Tensor, Tensor]
    ) -> _Estimate:
        """C3 and the u update per key (duplicates merged), identical on every rank; per-sample τ's Adam step."""
        rows, n, cd = batch.rows, batch.spos.shape[0], batch.spos.dtype
        spos = batch.spos[rows]
        log_g = [lse[i].to(cd) - _local(thetas[i], rows) * spos - math.log(n - 1) for i in range(2)]
        send = [torch.stack(log_g, dim=1)]
        if self.per_sample:
            send.append(torch.stack([thetas[i][rows] * (mom[i] - spos) for i in range(2)], dim=1))
        gathered = comm.all_gather_rows(send, op="fastclip_g")
        lg = gathered[0]
        uniq, group = torch.unique(batch.keys, return_inverse=True)
        lg_key = log_mean_by_group(lg, group, uniq.numel())[group]
        lu_old = batch.old[:, :2]
        gamma = self.gamma()
        if gamma == 1.0:
            lu = lg_key
        else:
            mixed = torch.logaddexp(lu_old + math.log1p(-gamma), lg_key + math.log(gamma))
            if self.settings.u_reset == "tiny":
                reset = ~((lu_old >= LOG_U_TINY) & (lu_old < math.inf))  # also NaN
            else:
                reset = torch.isneginf(lu_old)
            lu = torch.where(reset, lg_key, mixed)
        leu = torch.logaddexp(torch.full_like(lu, math.log(self.settings.eps)), lu)
        ratio = torch.exp(lg - leu)
        new_state = [lu]
        if self.per_sample:
            new_state.append(self._tau_step(batch.old, leu, ratio, gathered[1], group, uniq.numel()))
        return _Estimate(lg, lu, leu, ratio, gamma, torch.cat(new_state, dim=1))

    def _surrogate(
        self,
        x: Tensor,
        t: Tensor,
        theta: Tensor,
        batch: _Batch,
        est: _Estimate,
        mom: list[Tensor],
        thetas: tuple[Tensor, Tensor],
    ) -> Tensor:
        """The FCCO surrogate (value = this rank's estimate; backward = the estimator, see module doc)."""
        n, rows, cd = batch.spos.shape[0], batch.rows, batch.spos.dtype
        if self.objective == "gcl":
            alphas = [torch.full((1,), 0.5 / n, dtype=cd, device=x.device)] * 2
        elif self.objective == "rgcl_g":
            alphas = [(0.5 / n) / theta.detach()] * 2
        else:
            alphas = [(0.5 / n) / thetas[0], (0.5 / n) / thetas[1]]
        log_n1 = math.log(n - 1)
        img, txt = (
            _Anchors(th, th * batch.spos + est.leu[:, i] + log_n1, alphas[i], est.ratio[rows, i], mom[i])
            for i, th in enumerate(thetas)
        )
        code = self.settings.tau_grad == "fastclip_code"
        blk = _Block(
            batch.xs, batch.ts, img, txt, batch.spos[rows], rows, float(comm.world_size()),
            self.feature_scale(theta), 2.0 if code else 1.0, self.settings.impl,
        )  # fmt: skip
        return _FccoSurrogate.apply(x, t, theta, blk)

    def _outputs(self, fcco: Tensor, theta: Tensor, batch: _Batch, est: _Estimate) -> dict:
        """``loss`` = surrogate gradient + the local objective value; ``objective``, ``tau``, ``gamma`` metrics."""
        s, rows = self.settings, batch.rows
        leg = torch.logaddexp(torch.full_like(est.lg, math.log(s.eps)), est.lg)
        if self.per_sample:
            col = self.state.column
            tau1, tau2 = batch.old[:, col("tau1")], batch.old[:, col("tau2")]
            local_value = 0.5 * (tau1[rows] * (est.leu[rows, 0] + s.rho) + tau2[rows] * (est.leu[rows, 1] + s.rho))
            objective = 0.5 * (tau1 * (leg[:, 0] + s.rho) + tau2 * (leg[:, 1] + s.rho))
            tau_metric = 0.5 * (tau1.mean() + tau2.mean())
        else:
            tau = (1.0 / theta).reshape(())
            log_u = est.lu if s.tau_grad == "fastclip_code" else est.leu  # τ's log term (public code: no ε)
            local_value, objective = 0.5 * log_u[rows].sum(1), 0.5 * leg.sum(1)
            if self.objective == "rgcl_g":
                local_value, objective = tau * local_value + s.rho * tau, tau * objective + s.rho * tau
            tau_metric = tau
        loss = fcco - fcco.detach() + local_value.mean()
        return {
            "loss": loss,
            "objective": objective.mean().detach(),
            "tau": tau_metric.detach(),
            "gamma": torch.tensor(est.gamma),
        }

    def feature_scale(self, theta: Tensor) -> Tensor | float:
        """Factor on the features' gradient relative to the objective's: ``multiply_tau`` gives every global-τ
        loss the w-gradient of τ·GCL (exact for RGCL-g), off gives that of GCL (exact for sogclr/v0/v1)."""
        if self.per_sample or self.multiply_tau == (self.objective == "rgcl_g"):
            return 1.0
        tau = (1.0 / theta.detach()).reshape(())
        return tau if self.multiply_tau else 1.0 / tau

    def _tau_step(self, old: Tensor, leu: Tensor, ratio: Tensor, c: Tensor, group: Tensor, groups: int) -> Tensor:
        """Per-sample Adam on τ (module doc); returns the new ``[tau1, tau2, m1, m2, v1, v2]`` columns."""
        s = self.settings
        grad = leu + s.rho - ratio * c
        count = torch.bincount(group, minlength=groups).to(grad.dtype)[:, None]
        grad = (grad.new_zeros((groups, 2)).index_add_(0, group, grad) / count)[group]
        grad = grad.clamp(-TAU_GRAD_CLAMP, TAU_GRAD_CLAMP)
        col = self.state.column
        tau = old[:, [col("tau1"), col("tau2")]]
        m, v = old[:, [col("m1"), col("m2")]], old[:, [col("v1"), col("v2")]]
        beta1, beta2 = (s.tau_beta1, s.tau_beta2) if self.epoch > 0 else (0.0, 0.0)
        m = beta1 * m + (1.0 - beta1) * grad
        v = beta2 * v + (1.0 - beta2) * grad * grad
        steps = self.epoch + 1
        m_hat, v_hat = m / (1.0 - beta1**steps), v / (1.0 - beta2**steps)
        tau = (tau - s.lr_tau * m_hat / (v_hat.sqrt() + s.tau_eps)).clamp(s.tau_min, TAU_MAX)
        return torch.cat([tau, m, v], dim=1)
