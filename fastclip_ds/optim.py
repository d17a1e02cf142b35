"""Optimizers (AdamW, LAMB, Lion, SGD) with OpenCLIP/FastCLIP parameter groups, and the LR / τ-LR schedule.

Parameter groups (:func:`param_groups`), each tagged with a ``"name"``:

- ``decay``: every trainable tensor not matched below (weights with ndim ≥ 2), weight decay ``weight_decay``;
- ``no_decay``: open_clip's exclude rule, ``ndim < 2`` or ``"bn"``/``"ln"``/``"bias"`` in the name
  (biases, norms, ``class_embedding``); weight decay 0. As in open_clip, 2-D positional and token
  embeddings are *decayed*;
- ``logit_scale``: the temperature parameter alone, weight decay 0, lr ``lr_tau``; frozen
  (``requires_grad=False``, no group) when the temperature is not learned by the optimizer.

Empty groups are dropped. LAMB follows the public FastCLIP code: the update is the bias-corrected Adam
direction plus ``weight_decay·w``, scaled by the trust ratio ‖w‖/‖update‖ only in groups with weight
decay ≠ 0 (so biases, norms and ``logit_scale`` take plain Adam steps; a zero norm gives ratio 1).
The ratio is per parameter tensor. Under ZeRO ≥ 1 DeepSpeed hands the optimizer one flat partition per
group (per sub-group at ZeRO-3) instead of the tensors; :func:`enable_layerwise_lamb` gives LAMB the layout
of those partitions, and the per-tensor squared norms are then summed over the ranks by one all-reduce of
2·(tensors + 1) numbers per group and step, so every stage takes the same step as ZeRO-0.
Lion (Chen et al. 2023): ``w ← w·(1 − lr·wd) − lr·sign(β1·m + (1−β1)·g)``, then ``m ← β2·m + (1−β2)·g``.
AdamW and SGD are torch's; AdamW runs fused (one kernel over all tensors: on CPU about 5× faster than its
per-tensor loop). SGD's ``weight_decay`` is torch's L2 term added to the gradient.

Schedule (:class:`LRSchedule`), indexed by the optimizer step t about to be taken (t = 0, 1, ...), as
OpenCLIP/FastCLIP: warm-up ``lr·(t+1)/W`` for t < W, then ``cosine`` ``lr_min + ½(1 + cos(π(t−W)/(T−W)))
(lr − lr_min)`` (held at ``lr_min`` from T on) or ``const`` ``lr`` (after the same warm-up, as OpenCLIP;
FastCLIP's script skips it, so set W = 0 to reproduce that). The ``logit_scale`` group has its own
rule: ``cosine`` (the model's warm-up and cosine with base ``lr_tau``), ``const`` (``lr_tau``, no warm-up) or
``step_thresh`` (``lr_tau``, no warm-up, times 1/3 while the current τ ≤ 0.03). As in the public code,
step_thresh re-reads τ at every step: if τ climbs back above 0.03, the lr returns to ``lr_tau``.
DeepSpeed calls ``step()`` after the optimizer step, so ``tau_fn`` sees the updated (and clamped) τ;
under ZeRO-3 the one-element ``logit_scale`` stays whole (below the persistence threshold).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn
from torch.optim import Optimizer

from . import comm, ds_compat

DEFAULTS: dict[str, Any] = {
    "name": "adamw",
    "betas": [0.9, 0.98],
    "eps": 1e-6,
    "weight_decay": 0.1,
    "momentum": 0.9,
    "nesterov": False,
}
OPTIMIZERS = ("adamw", "lamb", "lion", "sgd")
LR_SCHEDULERS = ("cosine", "const")
TAU_SCHEDULERS = ("cosine", "const", "step_thresh")
TAU_THRESH = 0.03
TAU_THRESH_FACTOR = 1.0 / 3.0


def _check_betas(betas: Any) -> tuple[float, float]:
    if not (isinstance(betas, list | tuple) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"optimizer.betas: expected two numbers in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``optimizer`` section over :data:`DEFAULTS`, checked (the one place these rules live); a bad value
    raises ``ValueError("optimizer.KEY: message")``."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"optimizer.{unknown[0]}: unknown key (known: {', '.join(DEFAULTS)})")
    cfg = {**DEFAULTS, **cfg}
    if cfg["name"] not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: {cfg['name']!r} is not one of {', '.join(OPTIMIZERS)}")
    _check_betas(cfg["betas"])
    for key in ("eps", "weight_decay", "momentum"):
        if not _is_number(cfg[key]) or cfg[key] < 0:
            raise ValueError(f"optimizer.{key}: must be >= 0, got {cfg[key]!r}")
    if cfg["nesterov"] and cfg["momentum"] <= 0:
        raise ValueError(f"optimizer.nesterov: needs optimizer.momentum > 0, got {cfg['momentum']!r}")
    return cfg


@dataclass(frozen=True)
class FlatLayout:
    """How a flat (ZeRO) tensor splits into parameter tensors: consecutive chunks of ``lengths`` elements,
    chunk k belonging to tensor ``layers[k]`` (``num_layers`` for padding); ``reduce`` sums a tensor over
    the ranks sharing the tensors (``None`` when one rank holds them whole)."""

    lengths: list[int]
    layers: list[int]
    num_layers: int
    reduce: Callable[[torch.Tensor], Any] | None


class _PerParamOptimizer(Optimizer):
    """``step()`` boilerplate shared by LAMB and Lion: closure, dense-gradient check, one update per tensor."""

    def _update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._update(p, self.state[p], group)
        return loss


class Lamb(_PerParamOptimizer):
    """LAMB (You et al. 2019) as in the public FastCLIP code; see the module docstring for the rule.

    ``layouts`` maps ``id(flat tensor)`` to its :class:`FlatLayout`; any other tensor is one layer.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"Lamb: lr ({lr}), eps ({eps}) and weight_decay ({weight_decay}) must be >= 0")
        super().__init__(params, {"lr": lr, "betas": _check_betas(betas), "eps": eps, "weight_decay": weight_decay})
        self.layouts: dict[int, FlatLayout] = {}

    def _apply_trust_ratio(self, p: torch.Tensor, update: torch.Tensor) -> None:
        """Scale ``update`` by ‖w‖/‖update‖ per parameter tensor (1 where either norm is 0)."""
        acc = torch.promote_types(p.dtype, torch.float32)
        layout = self.layouts.get(id(p))
        if layout is None:
            sq = torch.stack([p.to(acc).square().sum(), update.to(acc).square().sum()])[:, None]
            chunks, layers = [update], [0]
        else:
            chunks, layers = update.reshape(-1).split(layout.lengths), layout.layers
            index = torch.tensor(layers, device=p.device)
            sq = torch.zeros(2, layout.num_layers + 1, dtype=acc, device=p.device)
            for row, tensor_chunks in enumerate((p.reshape(-1).split(layout.lengths), chunks)):
                sq[row].index_add_(0, index, torch.stack([c.to(acc).square().sum() for c in tensor_chunks]))
            if layout.reduce is not None:
                layout.reduce(sq)
        w_norm, u_norm = sq.sqrt()
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm)).to(p.dtype)
        for chunk, layer in zip(chunks, layers, strict=True):
            chunk.mul_(ratio[layer])

    def _update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (v / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
        update = (m / (1 - beta1 ** state["step"])).div_(denom)
        if group["weight_decay"] != 0:
            update.add_(p, alpha=group["weight_decay"])
            self._apply_trust_ratio(p, update)
        p.add_(update, alpha=-group["lr"])


class Lion(_PerParamOptimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with decoupled weight decay."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"Lion: lr ({lr}) and weight_decay ({weight_decay}) must be >= 0")
        super().__init__(params, {"lr": lr, "betas": _check_betas(betas), "weight_decay": weight_decay})

    def _update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
        m = state["exp_avg"]
        direction = torch.lerp(p.grad, m, beta1).sign_()
        p.mul_(1 - lr * group["weight_decay"]).add_(direction, alpha=-lr)
        m.lerp_(p.grad, 1 - beta2)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's weight-decay exclude rule (``logit_scale`` is handled separately)."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name


def param_groups(
    model: nn.Module, *, weight_decay: float, lr_tau: float, train_logit_scale: bool
) -> list[dict[str, Any]]:
    """The ``decay`` / ``no_decay`` / ``logit_scale`` groups of ``model``; freezes logit_scale if not trained."""
    groups: dict[str, dict[str, Any]] = {
        "decay": {"name": "decay", "params": [], "weight_decay": weight_decay},
        "no_decay": {"name": "no_decay", "params": [], "weight_decay": 0.0},
        "logit_scale": {"name": "logit_scale", "params": [], "weight_decay": 0.0, "lr": lr_tau},
    }
    for name, p in model.named_parameters():
        if "logit_scale" in name:
            p.requires_grad_(train_logit_scale)
            key = "logit_scale"
        else:
            key = "no_decay" if is_no_decay(name, p) else "decay"
        if p.requires_grad:
            groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(
    model: nn.Module, cfg: dict[str, Any], *, lr: float, lr_tau: float | None, train_logit_scale: bool
) -> Optimizer:
    """The optimizer named by ``cfg`` (the config's ``optimizer`` section, checked by :func:`check_config`).

    ``lr_tau=None`` means the ``logit_scale`` group uses ``lr``.
    """
    cfg = check_config(cfg)
    name, betas = cfg["name"], _check_betas(cfg["betas"])
    if lr <= 0 or (lr_tau is not None and lr_tau <= 0):
        raise ValueError(f"learning rates must be > 0 (lr={lr}, lr_tau={lr_tau})")
    groups = param_groups(
        model,
        weight_decay=cfg["weight_decay"],
        lr_tau=lr if lr_tau is None else lr_tau,
        train_logit_scale=train_logit_scale,
    )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg["eps"], fused=True)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=cfg["eps"])
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg["momentum"], nesterov=cfg["nesterov"])


def _partition_layout(offsets: list[int], numels: list[int], start: int, size: int) -> tuple[list[int], list[int]]:
    """Chunks of the flat range [start, start+size) over tensors at ``offsets`` (gaps are padding)."""
    lengths: list[int] = []
    layers: list[int] = []
    pos, end = start, start + size
    for layer, (offset, numel) in enumerate(zip(offsets, numels, strict=True)):
        lo, hi = max(offset, start), min(offset + numel, end)
        if lo >= hi:
            continue
        if lo > pos:
            lengths.append(lo - pos)
            layers.append(len(numels))
        lengths.append(hi - lo)
        layers.append(layer)
        pos = hi
    if pos < end:
        lengths.append(end - pos)
        layers.append(len(numels))
    return lengths, layers


def enable_layerwise_lamb(engine: Any) -> None:
    """Tell a :class:`Lamb` inside a DeepSpeed ``engine`` how its ZeRO partitions split into tensors.

    Call once after ``deepspeed.initialize``; a no-op for other optimizers and for wrappers that keep
    one fp32 tensor per parameter (ZeRO-0). The partitions come from :func:`ds_compat.zero_partitions`.
    """
    lamb = engine.basic_optimizer
    if not isinstance(lamb, Lamb):
        return
    parts = ds_compat.zero_partitions(engine)
    if parts is None:
        wrapper = type(engine.optimizer).__name__
        raise ValueError(f"LAMB: layer-wise trust ratios are not supported under DeepSpeed's {wrapper}")
    for part in parts:
        lengths, layers = _partition_layout(part.offsets, part.numels, part.start, part.size)
        if sum(lengths) != part.flat.numel():
            raise RuntimeError(f"LAMB: ZeRO partition layout ({sum(lengths)}) != partition ({part.flat.numel()})")
        lamb.layouts[id(part.flat)] = FlatLayout(lengths, layers, len(part.numels), _norm_reducer(part.group))


def _norm_reducer(group: Any) -> Callable[[torch.Tensor], None]:
    """In-place sum over ``group`` (op ``lamb_norms``), through the accelerator: NCCL cannot reduce an offloaded
    CPU tensor."""
    device = get_accelerator().current_device_name()

    def reduce(t: torch.Tensor) -> None:
        on_device = t.to(device)
        comm.all_reduce_sum_(on_device, op="lamb_norms", group=group)
        t.copy_(on_device)

    return reduce


def warmup_cosine(step: int, base_lr: float, warmup_steps: int, total_steps: int, lr_min: float) -> float:
    """Linear warm-up ``base_lr·(step+1)/warmup_steps``, then cosine to ``lr_min`` at ``total_steps`` (held after)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(step - warmup_steps, total_steps - warmup_steps) / (total_steps - warmup_steps)
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - lr_min)


def warmup_const(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up as :func:`warmup_cosine`, then ``base_lr``."""
    return base_lr * (step + 1) / warmup_steps if step < warmup_steps else base_lr


class LRSchedule:
    """Per-group lr for each optimizer step; DeepSpeed-compatible client scheduler (``step``, ``state_dict``).

    Construction sets the lr of step 0; each :meth:`step` (DeepSpeed calls it after every applied
    optimizer step) advances to the next step and sets its lr. The base lrs are the groups' lrs at
    construction, so build this right after the optimizer, before any checkpoint is loaded.
    ``tau_fn`` returns the current τ (a float) and is read only by ``step_thresh``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        warmup_steps: int,
        total_steps: int,
        lr_min: float = 0.0,
        lr_scheduler: str = "cosine",
        tau_scheduler: str = "cosine",
        tau_fn: Callable[[], float] | None = None,
    ) -> None:
        if lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler: {lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
        if tau_scheduler not in TAU_SCHEDULERS:
            raise ValueError(f"tau_scheduler: {tau_scheduler!r} is not one of {', '.join(TAU_SCHEDULERS)}")
        if tau_scheduler == "step_thresh" and tau_fn is None:
            raise ValueError("tau_scheduler 'step_thresh' needs tau_fn, a callable returning the current tau")
        if warmup_steps < 0 or lr_min < 0:
            raise ValueError(f"warmup_steps ({warmup_steps}) and lr_min ({lr_min}) must be >= 0")
        uses_cosine = lr_scheduler == "cosine" or tau_scheduler == "cosine"
        if uses_cosine and total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}) for cosine")
        self.optimizer = optimizer
        self.warmup_steps, self.total_steps, self.lr_min = warmup_steps, total_steps, lr_min
        self.lr_scheduler, self.tau_scheduler, self.tau_fn = lr_scheduler, tau_scheduler, tau_fn
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def _group_lr(self, name: str | None, base_lr: float) -> float:
        step = self.last_step
        rule = self.tau_scheduler if name == "logit_scale" else self.lr_scheduler
        if rule == "cosine":
            return warmup_cosine(step, base_lr, self.warmup_steps, self.total_steps, self.lr_min)
        if name != "logit_scale":
            return warmup_const(step, base_lr, self.warmup_steps)
        if rule == "const":
            return base_lr
        assert self.tau_fn is not None  # step_thresh; checked in __init__
        return base_lr * TAU_THRESH_FACTOR if self.tau_fn() <= TAU_THRESH else base_lr

    def _apply(self) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = self._group_lr(group.get("name"), base_lr)

    def step(self, *_: Any, **__: Any) -> None:
        """Advance to the next optimizer step and set its lrs (arguments, as DeepSpeed may pass, are ignored)."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step and re-apply its lrs (overriding lrs a loaded optimizer state carried)."""
        self.last_step = int(state["last_step"])
        self._apply()
