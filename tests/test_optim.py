"""Optimizers, parameter groups and LR / τ-LR schedules (fastclip_ds.optim)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fastclip_ds.compat import import_open_clip
from fastclip_ds.multiproc import free_port
from fastclip_ds.optim import (
    DEFAULTS,
    FlatLayout,
    Lamb,
    Lion,
    LRSchedule,
    _partition_layout,
    build_optimizer,
    check_config,
    enable_layerwise_lamb,
    warmup_cosine,
)

F64 = torch.float64


def tiny_clip() -> nn.Module:
    open_clip = import_open_clip()
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 16},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    )
    model.logit_scale = nn.Parameter(model.logit_scale.detach().reshape(1))  # DeepSpeed rejects 0-dim params
    return model


def fixed_problem(seed: int = 0) -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    """A weight matrix, a bias and one all-zero weight (float64), with three steps of fixed gradients each."""
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(3, 4, generator=gen, dtype=F64))
    b = nn.Parameter(torch.randn(4, generator=gen, dtype=F64))
    z = nn.Parameter(torch.zeros(2, 2, dtype=F64))
    grads = [[torch.randn(p.shape, generator=gen, dtype=F64) for p in (w, b, z)] for _ in range(3)]
    return [w, b, z], grads


def run_steps(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


# ---------------------------------------------------------------- LAMB and Lion against hand-written formulas


def lamb_reference(w0: torch.Tensor, grads: list[torch.Tensor], lr, beta1, beta2, eps, wd) -> torch.Tensor:
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        r = (m / (1 - beta1**t)) / (torch.sqrt(v / (1 - beta2**t)) + eps) + wd * w
        trust = 1.0
        if wd != 0:
            w_norm, r_norm = math.sqrt(float((w * w).sum())), math.sqrt(float((r * r).sum()))
            trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        w = w - lr * trust * r
    return w


def lion_reference(w0: torch.Tensor, grads: list[torch.Tensor], lr, beta1, beta2, wd) -> torch.Tensor:
    w, m = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        c = beta1 * m + (1 - beta1) * g
        w = w - lr * (torch.sign(c) + wd * w)
        m = beta2 * m + (1 - beta2) * g
    return w


@pytest.mark.parametrize("n_steps", [1, 3])
def test_lamb_matches_formula(n_steps: int) -> None:
    params, grads = fixed_problem()
    grads = grads[:n_steps]
    initial = [p.detach().clone() for p in params]
    lr, betas, eps = 0.01, (0.9, 0.98), 1e-6
    opt = Lamb(
        [{"params": [params[0], params[2]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
        eps=eps,
    )
    run_steps(opt, params, grads)
    for i, wd in ((0, 0.1), (1, 0.0), (2, 0.1)):
        expected = lamb_reference(initial[i], [g[i] for g in grads], lr, *betas, eps, wd)
        torch.testing.assert_close(params[i].detach(), expected, rtol=1e-12, atol=1e-14)
    # The trust ratio is what sets the step size of a decayed weight: ‖Δw‖ = lr·‖w‖ on step 1.
    if n_steps == 1:
        assert float((params[0].detach() - initial[0]).norm()) == pytest.approx(
            lr * float(initial[0].norm()), rel=1e-12
        )


def test_lamb_flat_layout_matches_separate_tensors() -> None:
    """A ZeRO-style flat tensor (two tensors plus padding) with its layout steps like the tensors themselves."""
    params, grads = fixed_problem(seed=3)
    w, b = params[0], params[1]
    pad2, pad1 = torch.zeros(2, dtype=F64), torch.zeros(1, dtype=F64)
    flat = nn.Parameter(torch.cat([w.detach().reshape(-1), pad2, b.detach(), pad1]))
    separate = Lamb([w, b], lr=0.01, weight_decay=0.1)
    packed = Lamb([flat], lr=0.01, weight_decay=0.1)
    packed.layouts[id(flat)] = FlatLayout([12, 2, 4, 1], [0, 2, 1, 2], 2, None)
    for gw, gb, _ in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        flat.grad = torch.cat([gw.reshape(-1), pad2, gb, pad1])
        separate.step()
        packed.step()
    expected = torch.cat([w.detach().reshape(-1), pad2, b.detach(), pad1])
    torch.testing.assert_close(flat.detach(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("start", "lengths", "layers"),
    [(4, [2, 2, 8], [0, 3, 1]), (16, [2, 2, 3, 5], [1, 3, 2, 3]), (0, [6, 2, 4], [0, 3, 1])],
)
def test_partition_layout(start: int, lengths: list[int], layers: list[int]) -> None:
    """Tensors of 6, 10 and 3 elements at offsets 0, 8, 20 (padding between); 12-element partitions."""
    assert _partition_layout([0, 8, 20], [6, 10, 3], start, 12) == (lengths, layers)


@pytest.mark.parametrize("n_steps", [1, 3])
def test_lion_matches_formula(n_steps: int) -> None:
    params, grads = fixed_problem(seed=1)
    grads = grads[:n_steps]
    initial = [p.detach().clone() for p in params]
    lr, betas = 0.02, (0.9, 0.99)
    opt = Lion(
        [{"params": [params[0], params[2]], "weight_decay": 0.5}, {"params": [params[1]], "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
    )
    run_steps(opt, params, grads)
    for i, wd in ((0, 0.5), (1, 0.0), (2, 0.5)):
        expected = lion_reference(initial[i], [g[i] for g in grads], lr, *betas, wd)
        torch.testing.assert_close(params[i].detach(), expected, rtol=1e-12, atol=1e-14)


def test_lion_default_betas_and_sign_step() -> None:
    assert Lion([nn.Parameter(torch.zeros(1))]).defaults["betas"] == (0.9, 0.99)
    w = nn.Parameter(torch.zeros(3, dtype=F64))
    w.grad = torch.tensor([2.0, -1e-9, 0.0], dtype=F64)
    Lion([w], lr=0.1).step()
    assert w.detach().tolist() == [-0.1, 0.1, 0.0]


def test_optimizers_skip_params_without_grad() -> None:
    for cls in (Lamb, Lion):
        w = nn.Parameter(torch.ones(2, 2))
        opt = cls([w], lr=0.1, weight_decay=0.1)
        opt.step()
        assert torch.equal(w.detach(), torch.ones(2, 2)) and not opt.state


@pytest.mark.parametrize("cls", [Lamb, Lion])
def test_optimizer_state_dict_round_trip(cls: type[torch.optim.Optimizer]) -> None:
    params, grads = fixed_problem(seed=2)
    opt = cls([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}], lr=0.01)
    run_steps(opt, params, grads[:2])
    clones = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = cls([{"params": clones[:2], "weight_decay": 0.1}, {"params": clones[2:], "weight_decay": 0.0}], lr=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["lr"] == 0.01
    run_steps(opt, params, grads[2:])
    run_steps(opt2, clones, grads[2:])
    for p, q in zip(params, clones, strict=True):
        assert torch.equal(p.detach(), q.detach())


# ---------------------------------------------------------------- parameter groups and build_optimizer

# The tiny model's weights with ndim >= 2 and no "bn"/"ln"/"bias" in the name (open_clip decays them).
DECAYED = {
    "positional_embedding",
    "text_projection",
    "token_embedding.weight",
    "visual.positional_embedding",
    "visual.proj",
    "visual.conv1.weight",
    *(
        f"{tower}resblocks.0.{leaf}"
        for tower in ("visual.transformer.", "transformer.")
        for leaf in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ),
}


def group_names(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}


def test_param_groups_on_open_clip() -> None:
    model = tiny_clip()
    opt = build_optimizer(model, {"weight_decay": 0.2}, lr=1e-3, lr_tau=1e-4, train_logit_scale=True)
    assert isinstance(opt, torch.optim.AdamW)
    groups = group_names(model, opt)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "logit_scale"]
    assert groups["decay"] == DECAYED
    assert groups["logit_scale"] == {"logit_scale"}
    everything = {n for n, _ in model.named_parameters()}
    assert groups["no_decay"] == everything - DECAYED - {"logit_scale"}
    assert {"visual.class_embedding", "ln_final.weight", "visual.ln_pre.bias"} <= groups["no_decay"]
    by_name = {g["name"]: g for g in opt.param_groups}
    assert [by_name[k]["weight_decay"] for k in ("decay", "no_decay", "logit_scale")] == [0.2, 0.0, 0.0]
    assert [by_name[k]["lr"] for k in ("decay", "no_decay", "logit_scale")] == [1e-3, 1e-3, 1e-4]
    assert by_name["decay"]["betas"] == (0.9, 0.98) and by_name["decay"]["eps"] == 1e-6


def test_frozen_logit_scale_and_lr_tau_default() -> None:
    model = tiny_clip()
    opt = build_optimizer(model, {}, lr=1e-3, lr_tau=None, train_logit_scale=False)
    assert not model.logit_scale.requires_grad
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    model = tiny_clip()
    opt = build_optimizer(model, {}, lr=1e-3, lr_tau=None, train_logit_scale=True)
    assert model.logit_scale.requires_grad and opt.param_groups[2]["lr"] == 1e-3


@pytest.mark.parametrize(
    ("cfg", "cls", "expected"),
    [
        ({"name": "adamw", "betas": [0.8, 0.9], "eps": 1e-8}, torch.optim.AdamW, {"betas": (0.8, 0.9), "eps": 1e-8}),
        ({"name": "lamb", "eps": 1e-5}, Lamb, {"betas": (0.9, 0.98), "eps": 1e-5}),
        ({"name": "lion", "betas": [0.9, 0.99]}, Lion, {"betas": (0.9, 0.99)}),
        ({"name": "sgd", "momentum": 0.8, "nesterov": True}, torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
    ],
)
def test_build_optimizer_kinds(cfg: dict, cls: type, expected: dict) -> None:
    opt = build_optimizer(tiny_clip(), {**cfg, "weight_decay": 0.3}, lr=0.1, lr_tau=0.01, train_logit_scale=True)
    assert type(opt) is cls
    decay = opt.param_groups[0]
    assert decay["name"] == "decay" and decay["weight_decay"] == 0.3 and decay["lr"] == 0.1
    assert {k: decay[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "adam"}, "optimizer.name: 'adam' is not one of adamw, lamb, lion, sgd"),
        (
            {"beta": [0.9, 0.9]},
            "optimizer.beta: unknown key (known: name, betas, eps, weight_decay, momentum, nesterov)",
        ),
        ({"betas": [0.9, 1.0]}, "optimizer.betas: expected two numbers in [0, 1), got [0.9, 1.0]"),
        ({"betas": [0.9]}, "optimizer.betas: expected two numbers in [0, 1), got [0.9]"),
        ({"weight_decay": -1}, "optimizer.weight_decay: must be >= 0, got -1"),
        ({"eps": -1e-8}, "optimizer.eps: must be >= 0, got -1e-08"),
        (
            {"name": "sgd", "momentum": 0.0, "nesterov": True},
            "optimizer.nesterov: needs optimizer.momentum > 0, got 0.0",
        ),
    ],
)
def test_build_optimizer_rejects_bad_config(cfg: dict, message: str) -> None:
    """Each rule of :func:`check_config` fires with a one-line message naming the key (the config's validate
    reports the same message: tests/test_config.py)."""
    with pytest.raises(ValueError) as err:
        build_optimizer(tiny_clip(), cfg, lr=1e-3, lr_tau=None, train_logit_scale=True)
    assert str(err.value) == message


def test_defaults_are_open_clip_trains_vit_settings() -> None:
    """Missing keys fall back to DEFAULTS, whose AdamW betas and eps are open_clip_train's own ViT defaults
    (an independent source); catches a default that drifts from OpenCLIP or a key that is dropped on the way."""
    from open_clip_train.params import get_default_params

    reference = get_default_params("ViT-B-32")
    opt = build_optimizer(tiny_clip(), {}, lr=1e-3, lr_tau=None, train_logit_scale=True)
    assert type(opt) is torch.optim.AdamW
    decay = opt.param_groups[0]
    assert decay["betas"] == (reference["beta1"], reference["beta2"]) and decay["eps"] == reference["eps"]
    assert decay["weight_decay"] == 0.1  # FastCLIP's value (open_clip_train's --wd default is 0.2)
    assert check_config({}) == DEFAULTS


# ---------------------------------------------------------------- schedules


def scheduled(lr_scheduler: str, tau_scheduler: str, tau_fn=None, **kwargs) -> tuple[LRSchedule, nn.Parameter]:
    """A 3-group optimizer (lr 1e-3, lr_tau 1e-4) and its schedule: warm-up 10, total 110, lr_min 1e-5."""
    w, b, s = (nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1)))
    opt = torch.optim.AdamW(
        [
            {"name": "decay", "params": [w]},
            {"name": "no_decay", "params": [b], "weight_decay": 0.0},
            {"name": "logit_scale", "params": [s], "weight_decay": 0.0, "lr": 1e-4},
        ],
        lr=1e-3,
    )
    settings = {"warmup_steps": 10, "total_steps": 110, "lr_min": 1e-5, **kwargs}
    sched = LRSchedule(opt, lr_scheduler=lr_scheduler, tau_scheduler=tau_scheduler, tau_fn=tau_fn, **settings)
    return sched, w


def lrs_at(sched: LRSchedule, steps: list[int]) -> dict[int, list[float]]:
    out = {}
    while sched.last_step <= max(steps):
        if sched.last_step in steps:
            out[sched.last_step] = sched.get_last_lr()
        sched.step()
    return out


def test_cosine_schedule_key_steps() -> None:
    sched, _ = scheduled("cosine", "cosine")
    lrs = lrs_at(sched, [0, 9, 10, 60, 110, 150])
    lr, tau_lr, lr_min = 1e-3, 1e-4, 1e-5
    expected = {
        0: lr / 10,  # (step + 1) / warmup
        9: lr,  # warm-up ends
        10: lr,  # cosine starts
        60: lr_min + 0.5 * (lr - lr_min),  # middle
        110: lr_min,  # end
        150: lr_min,  # held after the end
    }
    for step, value in expected.items():
        tau_value = value * tau_lr / lr if step not in (110, 150) else lr_min
        if step == 60:
            tau_value = lr_min + 0.5 * (tau_lr - lr_min)
        assert lrs[step] == pytest.approx([value, value, tau_value], rel=1e-12), step


def test_const_schedules() -> None:
    sched, _ = scheduled("const", "const")
    lrs = lrs_at(sched, [0, 4, 10, 109])
    assert lrs[0] == pytest.approx([1e-4, 1e-4, 1e-4])  # model warms up, τ has no warm-up
    assert lrs[4] == pytest.approx([5e-4, 5e-4, 1e-4])
    assert lrs[10] == lrs[109] == pytest.approx([1e-3, 1e-3, 1e-4])


def test_step_thresh_drop() -> None:
    tau = {"value": 0.07}
    sched, _ = scheduled("cosine", "step_thresh", tau_fn=lambda: tau["value"])
    assert sched.get_last_lr()[2] == 1e-4  # no warm-up
    sched.step()
    assert sched.get_last_lr()[2] == 1e-4
    tau["value"] = 0.03  # at the threshold: the next step's lr drops to lr_tau / 3
    sched.step()
    assert sched.get_last_lr()[2] == pytest.approx(1e-4 / 3, rel=1e-15)
    assert sched.get_last_lr()[0] == pytest.approx(warmup_cosine(2, 1e-3, 10, 110, 1e-5))
    tau["value"] = 0.0301  # re-read every step, as in the public code
    sched.step()
    assert sched.get_last_lr()[2] == 1e-4


def test_scheduler_state_dict_round_trip() -> None:
    tau = {"value": 0.02}
    sched, _ = scheduled("cosine", "step_thresh", tau_fn=lambda: tau["value"])
    for _ in range(37):
        sched.step()
    state = sched.state_dict()
    json.dumps(state)  # plain data only: DeepSpeed pickles it into every checkpoint
    fresh, _ = scheduled("cosine", "step_thresh", tau_fn=lambda: tau["value"])
    fresh.optimizer.param_groups[0]["lr"] = 123.0  # what a loaded optimizer state may carry: overridden
    fresh.load_state_dict(state)
    assert fresh.last_step == 37 and fresh.get_last_lr() == sched.get_last_lr()
    sched.step()
    fresh.step()
    assert fresh.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr_scheduler": "linear"}, "lr_scheduler: 'linear' is not one of cosine, const"),
        ({"tau_scheduler": "step"}, "tau_scheduler: 'step' is not one of cosine, const, step_thresh"),
        ({"tau_scheduler": "step_thresh"}, "tau_scheduler 'step_thresh' needs tau_fn"),
        ({"total_steps": 10}, "total_steps (10) must exceed warmup_steps (10) for cosine"),
    ],
)
def test_scheduler_rejects_bad_settings(kwargs: dict, message: str) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    settings = {"warmup_steps": 10, "total_steps": 100, "lr_min": 0.0, "tau_scheduler": "const", "tau_fn": None}
    with pytest.raises(ValueError) as err:
        LRSchedule(opt, **{**settings, **kwargs})
    assert message in str(err.value)


# ---------------------------------------------------------------- inside a real DeepSpeed engine (subprocess)

DS_LRS = {"adamw": 3e-3, "lamb": 3e-2, "lion": 3e-4, "sgd": 0.3}
DS_STEPS = 5


def ds_worker(stages: list[int], names: list[str], ckpt_dir: str) -> None:
    """Train the tiny CLIP a few steps per (ZeRO stage, optimizer); rank 0 prints one JSON line each.

    Every rank sees the same 8 pairs, so the averaged gradient, and the run, match a 1-rank run. A
    checkpoint saved after step 3 (in ``ckpt_dir``, shared by the ranks) is loaded into a fresh engine,
    which then repeats steps 4 and 5.
    """
    import deepspeed

    from fastclip_ds.ds_compat import patch_deepspeed

    patch_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo")
    world = int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    images, tokens = torch.randn(8, 3, 16, 16), torch.randint(1, 64, (8, 8))
    targets = torch.arange(8)

    def make_engine(stage: int, name: str) -> Any:
        lr = DS_LRS[name]
        torch.manual_seed(1)
        model = tiny_clip()
        opt = build_optimizer(model, {"name": name}, lr=lr, lr_tau=lr / 2, train_logit_scale=True)
        sched = LRSchedule(opt, warmup_steps=2, total_steps=8, lr_min=0.0, tau_scheduler="const", tau_fn=None)
        config = {
            "train_batch_size": 8 * world,
            "train_micro_batch_size_per_gpu": 8,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**6,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
        enable_layerwise_lamb(engine)
        return engine

    def train(engine: Any, steps: int, losses: list[float], lrs: list[list[float]]) -> None:
        for _ in range(steps):
            lrs.append(engine.get_lr())
            img, txt, scale = engine(images, tokens)
            logits = scale * img @ txt.T
            loss = (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())

    for stage in stages:
        for name in names:
            engine = make_engine(stage, name)
            losses: list[float] = []
            lrs: list[list[float]] = []
            train(engine, 3, losses, lrs)
            tag = f"{stage}-{name}"
            engine.save_checkpoint(ckpt_dir, tag=tag)
            train(engine, DS_STEPS - 3, losses, lrs)
            resumed = make_engine(stage, name)
            resumed.load_checkpoint(ckpt_dir, tag=tag)
            resumed_losses: list[float] = []
            resumed_lrs: list[list[float]] = []
            train(resumed, DS_STEPS - 3, resumed_losses, resumed_lrs)
            if int(os.environ["RANK"]) == 0:
                groups = [g.get("name") for g in engine.optimizer.param_groups]
                row = {"stage": stage, "name": name, "losses": losses, "lrs": lrs, "groups": groups}
                print(json.dumps({**row, "resumed_losses": resumed_losses, "resumed_lrs": resumed_lrs}), flush=True)


def run_ds(stages: list[int], names: list[str], ranks: int, ckpt_dir: Path) -> dict[tuple[int, str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [",".join(map(str, stages)), ",".join(names), str(ckpt_dir)]
    if ranks == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        cmd = [sys.executable, __file__, *args]
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"]
        cmd = [*torchrun, "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {(r["stage"], r["name"]): r for r in rows}


def test_optimizers_in_deepspeed_engine(tmp_path: Path) -> None:
    """Each optimizer trains at ZeRO 0, 2 and 3 under the schedule, and every stage takes the same steps."""
    results = run_ds([0, 2, 3], list(DS_LRS), ranks=1, ckpt_dir=tmp_path)
    assert sorted(results) == sorted((stage, name) for stage in (0, 2, 3) for name in DS_LRS)
    for (stage, name), r in results.items():
        lr = DS_LRS[name]
        assert r["groups"] == ["decay", "no_decay", "logit_scale"], (stage, name)
        assert r["losses"][-1] < 0.9 * r["losses"][0], (stage, name, r["losses"])
        for step, lrs in enumerate(r["lrs"]):
            model_lr = warmup_cosine(step, lr, 2, 8, 0.0)
            assert lrs == pytest.approx([model_lr, model_lr, lr / 2], rel=1e-12), (stage, name, step)
        # ZeRO flattens the groups; LAMB's per-tensor trust ratio must survive that (enable_layerwise_lamb).
        assert r["losses"] == pytest.approx(results[0, name]["losses"], rel=1e-5), (stage, name)
        # DeepSpeed checkpoints carry the optimizer and schedule state: the resumed run repeats steps 4-5.
        assert r["resumed_lrs"] == r["lrs"][3:], (stage, name)
        assert r["resumed_losses"] == pytest.approx(r["losses"][3:], rel=1e-6), (stage, name)


@pytest.mark.slow
def test_lamb_two_ranks_matches_one_rank(tmp_path: Path) -> None:
    """At 2 ranks ZeRO-2/3 split tensors across ranks; the all-reduced trust ratios keep LAMB's steps."""
    one = run_ds([0], ["lamb"], ranks=1, ckpt_dir=tmp_path / "one")
    two = run_ds([2, 3], ["lamb"], ranks=2, ckpt_dir=tmp_path / "two")
    for stage in (2, 3):
        r = two[stage, "lamb"]
        assert r["losses"] == pytest.approx(one[0, "lamb"]["losses"], rel=1e-5), stage
        assert r["resumed_losses"] == pytest.approx(r["losses"][3:], rel=1e-6), stage


if __name__ == "__main__":
    ds_worker([int(x) for x in sys.argv[1].split(",")], sys.argv[2].split(","), sys.argv[3])
