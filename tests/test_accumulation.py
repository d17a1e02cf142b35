"""Exact gradient accumulation (``train.micro_batch_size``, :mod:`fastclip_ds.accumulate`): the same update, u and τ
as the whole batch at once, on real DeepSpeed engines; the RNG replay; resume; the batch arithmetic's errors."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from fastclip_ds import train
from fastclip_ds.multiproc import spawn

from .test_reliability import FASTCLIP, assert_same_final_state, ds, launch, weights
from .test_train import REPO, metrics, run, small_run

LOSSES = ("openclip", "fastclip_v3", "fastclip_v2")


def no_boundary(_: bool) -> None:
    """Plain torch has no accumulation boundary to set."""


def trainer_sets(root: str, out: str, loss: str, micro: int | None, *extra: str) -> list[str]:
    """fastclip-micro on the digits shards (random augmentation on), global batch 32, SGD at a constant lr without
    warm-up: the update is -lr × the (clipped) gradient, so comparing updates compares gradients (Adam's would
    compare little more than their signs)."""
    sets = [*small_run(Path(root), Path(out))[1::2], "data.num_workers=0", "eval.data=null", f"loss.name={loss}"]
    sets += [f"train.micro_batch_size={json.dumps(micro)}", "optimizer.name=sgd", "train.warmup_steps=0"]
    return [*sets, "train.lr_scheduler=const", "train.lr=0.1", "loss.lr_tau=0.1", *extra]


def make_trainer(root: str, out: str, loss: str, micro: int | None, ds_name: str, world: int, rank: int, *extra: str):
    from fastclip_ds.config import load_config, validate
    from fastclip_ds.engine import build_ds_config

    cfg = load_config(None, trainer_sets(root, out, loss, micro, *extra))
    validate(cfg, world)
    user = json.loads((REPO / "ds_configs" / f"{ds_name}.json").read_text())
    ds_config = build_ds_config(user, ds_name, global_batch=32, world_size=world, on_cuda=False, micro_batch=micro)
    return train.Trainer(cfg, ds_config, Path(out) / f"{loss}_{micro}", rank, world)


def weights_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the parameters (gathered under ZeRO-3)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {k: v.detach().clone() for k, v in module.named_parameters()}


def engine_worker(rank: int, world: int, root: str, out: str, losses: list[str], micros: list, ds_name: str):
    """Per loss and micro-batch (None: no accumulation) a Trainer on a real DeepSpeed engine takes two steps.
    Returns, per (loss, micro), the parameter update, this rank's loss-state table and DeepSpeed's gas."""
    found = {}
    for loss in losses:
        for micro in micros:
            with make_trainer(root, out, loss, micro, ds_name, world, rank) as trainer:
                before = weights_of(trainer.engine.module)
                for step, (images, tokens, keys) in enumerate(trainer.open_loader()):
                    assert trainer.train_step(images, tokens, keys).outcome == train.APPLIED
                    if step == 1:
                        break
                after = weights_of(trainer.engine.module)
                state = getattr(trainer.loss_fn, "state", None)
                found[loss, micro] = {
                    "update": {k: after[k] - before[k] for k in before},
                    "state": None if state is None else state.table.clone(),
                    "gas": trainer.engine.gradient_accumulation_steps(),
                }
    return found


def float64_worker(rank: int, world: int, root: str, out: str, losses: list[str], steps: list[int]):
    """Float64 in plain torch (DeepSpeed's gradient all-reduce refuses float64): the trainer's model, loader
    (random augmentation) and loss settings; per loss and accumulation count, two SGD steps of a float64 copy of
    the model, rank gradients averaged with one all-reduce (DeepSpeed's ZeRO-0 reduction), the loss state in
    float64. ``1``: one forward of the whole batch; more: :class:`FeatureCache`. Returns updates and u / τ tables."""
    import copy

    from fastclip_ds import comm
    from fastclip_ds.accumulate import FeatureCache
    from fastclip_ds.config import dataset_size
    from fastclip_ds.losses import build_loss

    found = {}
    for loss in losses:
        with make_trainer(root, out, loss, None, "cpu_zero0_fp32", world, rank) as trainer:
            batches = [b for _, b in zip(range(2), trainer.open_loader(), strict=False)]
            base, cfg, per_epoch = trainer.engine.module, trainer.cfg, trainer.steps_per_epoch
        for count in steps:
            model = copy.deepcopy(base).double()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            sizes = {"dataset_size": dataset_size(cfg), "steps_per_epoch": per_epoch}
            loss_fn = build_loss(cfg["loss"], **sizes, lr=0.1, state_dtype=torch.float64)
            loss_fn.defer_updates = True
            for images, tokens, keys in batches:
                images = images.double()
                if count == 1:
                    f = model(image=images, text=tokens)
                    loss_fn(f["image_features"], f["text_features"], f["logit_scale"], keys)["loss"].backward()
                else:
                    cache = FeatureCache(model, loss_fn, count, torch.device("cpu"), torch.Tensor.backward, no_boundary)
                    result, backward = cache.forward(images, tokens, keys)
                    backward(result["loss"])
                loss_fn.commit()
                with torch.no_grad():
                    for p in model.parameters():
                        if p.grad is not None:
                            p.sub_(0.1 * comm.all_reduce_sum_(p.grad, "test") / world)
                model.zero_grad()
            after = model.state_dict()
            state = getattr(loss_fn, "state", None)
            found[loss, count] = {
                "update": {k: after[k] - before[k] for k in before},
                "state": None if state is None else state.table.clone(),
            }
    return found


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖b‖ over the finite entries (which must be the same ones); 0 when both are all zero."""
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    a, b = a[torch.isfinite(b)], b[torch.isfinite(b)]
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def assert_same_steps(found: dict, losses: tuple[str, ...], ref_key: object, keys: list, tol: float) -> None:
    for loss in losses:
        ref = found[loss, ref_key]
        assert sum(float(v.norm()) for v in ref["update"].values()) > 0
        for key in keys:
            got = found[loss, key]
            for name, delta in ref["update"].items():
                assert relative_error(got["update"][name], delta) <= tol, (loss, key, name)
            if ref["state"] is not None:
                assert torch.isfinite(ref["state"]).any()
                for col in range(ref["state"].shape[1]):  # log u1, log u2 (and τ1, τ2, Adam moments for v2)
                    assert relative_error(got["state"][:, col], ref["state"][:, col]) <= tol, (loss, key, col)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_accumulation_2_and_4_equals_the_whole_batch_in_float64(digits_root: Path, tmp_path: Path, world: int) -> None:
    """Float64 (plain torch: DeepSpeed's all-reduce refuses float64), random augmentation on: two steps with
    accumulation 2 and 4 give the parameter update (logit_scale = global τ included), u and per-sample τ of the
    whole global batch at once, to 1e-10 relative, on 1 and 2 ranks, for openclip, fastclip_v3 and fastclip_v2.
    Catches a loss fed one micro-batch (the global batch's negatives missing), a u/τ update per micro-batch instead
    of per step, a logit_scale gradient counted once per micro-batch, and features mismatched to their rows."""
    args = (str(digits_root), str(tmp_path), list(LOSSES), [1, 2, 4])
    for found in spawn(world, float64_worker, args, timeout=600):
        assert_same_steps(found, LOSSES, 1, [2, 4], 1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("ds_name", ["cpu_zero0_fp32", "cpu_zero2_fp32"])
def test_accumulation_on_deepspeed_engines_two_ranks(digits_root: Path, tmp_path: Path, ds_name: str) -> None:
    """Real DeepSpeed engines through the Trainer, fp32, 2 ranks: accumulation 2 (gradient_accumulation_steps 2,
    boundary on the last micro-batch only; ZeRO-0 reduces once, ZeRO-2 reduce-scatters each micro-batch into its
    partition) matches the whole batch to float32 rounding for openclip and fastclip_v3. Catches DeepSpeed's 1/gas
    loss scaling left on (update halved), a reduction that drops the first micro-batch, or a step per micro-batch."""
    args = (str(digits_root), str(tmp_path), ["openclip", "fastclip_v3"], [None, 8], ds_name)
    for found in spawn(2, engine_worker, args, timeout=600):
        assert found["openclip", None]["gas"] == 1 and found["openclip", 8]["gas"] == 2
        assert_same_steps(found, ("openclip", "fastclip_v3"), None, [8], 1e-4)


DROPOUT_MODEL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "head_width": 16, "layers": 1, "patch_dropout": 0.5},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def replay_worker(rank: int, world: int, model_json: str) -> dict:
    """A float64 model with patch dropout (random per forward) and a batch of 12 in 3 micro-batches. Per loss, the
    reference: the exact gradient of the whole-batch loss of the features that the three micro-batch forwards
    produce, run with autograd one after another from one seed (the draws pass 1 sees); then :class:`FeatureCache`
    from the same seed, with its RNG replay (``True``) and with the replay disabled (``False``). Returns the
    gradients and whether the RNG ends where the reference's does."""
    from fastclip_ds import accumulate
    from fastclip_ds.losses import build_loss
    from fastclip_ds.model import create_model

    model = create_model(model_json, seed=0).model.double().train()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(12, 3, 16, 16, generator=gen, dtype=torch.float64)
    tokens, keys = torch.randint(1, 400, (12, 20), generator=gen), torch.arange(12)
    restore, found = accumulate.set_rng_state, {}

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return out

    for name in ("openclip", "fastclip_v3"):
        loss_fn = partial(build_loss, {"name": name}, dataset_size=12, steps_per_epoch=1, state_dtype=torch.float64)
        torch.manual_seed(5)
        outs = [model(image=images[i : i + 4], text=tokens[i : i + 4]) for i in (0, 4, 8)]
        x, t = (torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features"))
        loss_fn()(x, t, outs[0]["logit_scale"], keys)["loss"].backward()
        found[name, "ref"], rng = grads(), torch.get_rng_state()
        for replay in (True, False):
            accumulate.set_rng_state = restore if replay else lambda *_: None
            cache = accumulate.FeatureCache(
                model, loss_fn(), 3, torch.device("cpu"), backward=torch.Tensor.backward, set_boundary=no_boundary
            )
            torch.manual_seed(5)
            result, backward = cache.forward(images, tokens, keys)
            backward(result["loss"])
            found[name, replay] = grads()
            found[name, replay, "same_rng"] = torch.equal(torch.get_rng_state(), rng)
    return found


def test_dropout_is_replayed_exactly(tmp_path: Path) -> None:
    """With model randomness (patch dropout) pass 2 must see pass 1's draws: for openclip and fastclip_v3 the
    accumulated gradient equals the exact gradient of the loss of the features pass 1 computed, to 1e-10 relative,
    and the RNG ends where pass 1 left it (training goes on as after one forward). Catches a replay that does not
    restore the RNG: the same check, with the restore disabled, fails (so the test can)."""
    path = tmp_path / "dropout-micro.json"
    path.write_text(json.dumps(DROPOUT_MODEL))
    (found,) = spawn(1, replay_worker, (str(path),), timeout=300)
    for loss in ("openclip", "fastclip_v3"):
        ref, got, broken = found[loss, "ref"], found[loss, True], found[loss, False]
        assert ref.keys() == got.keys() and "visual.conv1.weight" in ref
        for name, g in ref.items():
            assert relative_error(got[name], g) <= 1e-10, (loss, name)
        assert found[loss, True, "same_rng"]
        assert relative_error(broken["visual.conv1.weight"], ref["visual.conv1.weight"]) > 1e-3


@pytest.mark.slow
def test_sigkill_and_resume_with_accumulation_is_bit_identical(digits_root: Path, tmp_path: Path) -> None:
    """2 ranks, ZeRO-2, fastclip_v3, accumulation 2: killed after the step-2 save, resumed, the weights and u at
    step 6 equal an uninterrupted run's bit for bit. Catches RNG or accumulation state that the checkpoint does not
    carry (e.g. the replay leaving the RNG somewhere else than where a resumed run starts)."""
    accum = [
        "--set",
        "train.micro_batch_size=8",
        "--set",
        "train.save_every_steps=2",
        "--set",
        "train.keep_checkpoints=0",
    ]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert launch(tmp_path, 2, small_run(digits_root, ref, *FASTCLIP, *ds("cpu_zero2_fp32"), *accum)).returncode == 0
    args = small_run(digits_root, out, *FASTCLIP, *ds("cpu_zero2_fp32"), *accum)
    killed = launch(tmp_path, 2, args, "kill_after_save:2")
    assert killed.returncode != 0 and (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert launch(tmp_path, 2, [*args, "--resume", "latest"]).returncode == 0
    assert_same_final_state(out, ref, tmp_path)


@pytest.mark.parametrize("ds_config", ["cpu_zero0_fp32", "cpu_zero2_fp32"])
def test_nonfinite_steps_are_skipped_with_accumulation(digits_root: Path, tmp_path: Path, ds_config: str) -> None:
    """Accumulation 2, a NaN loss at step 2 and a NaN gradient (finite loss) at step 3: both steps are skipped
    (the NaN loss before pass 2, the NaN gradient by our check at ZeRO-0 / DeepSpeed's at ZeRO-2), the run goes on
    and ends with finite weights. Catches pass 2 run on a non-finite loss or an optimizer step taken on NaN
    gradients accumulated over the micro-batches."""
    out = tmp_path / "run"
    accum = ["--set", "train.micro_batch_size=16", "--set", "train.max_steps=4"]
    proc = launch(tmp_path, 1, small_run(digits_root, out, *FASTCLIP, *ds(ds_config), *accum), "nan:2;nangrad:3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [x["nonfinite_steps"] for x in metrics(out, "train")] == [0, 1, 2, 2]
    assert all(torch.isfinite(v).all() for v in weights(out, "step00000004", tmp_path).values())


def test_micro_batch_that_does_not_divide_is_a_one_line_config_error(tmp_path: Path) -> None:
    """global 32 on 1 rank, micro-batch 12: exit 2 before any process group, one line naming the key and where it
    was set. Catches a silently truncated micro-batch (samples dropped) or a DeepSpeed assertion deep in init."""
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"train": {"global_batch_size": 32, "micro_batch_size": 12}}))
    proc = run([sys.executable, "-m", "fastclip_ds.train", "--config", str(cfg)])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"config error: {cfg}: train.micro_batch_size: 12 is not a positive divisor of the per-rank batch 32 "
        "(train.global_batch_size=32 on 1 rank(s))"
    ]


def test_deepspeed_batch_keys_are_derived_from_the_micro_batch() -> None:
    """world 2 × micro-batch 4 × 4 accumulation steps = 32; a DeepSpeed JSON that says otherwise is refused.
    Catches gradient_accumulation_steps left at 1 (DeepSpeed would reduce and step after every micro-batch)."""
    from fastclip_ds.config import ConfigError
    from fastclip_ds.engine import build_ds_config

    cfg = build_ds_config({}, "ds.json", global_batch=32, world_size=2, on_cuda=False, micro_batch=4)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        32,
        4,
        4,
    )
    with pytest.raises(ConfigError, match=r"^ds.json: gradient_accumulation_steps: 2 contradicts .* \(expected 4\)"):
        build_ds_config(
            {"gradient_accumulation_steps": 2}, "ds.json", global_batch=32, world_size=2, on_cuda=False, micro_batch=4
        )


OOM_DRIVER = """
import sys

import torch

from fastclip_ds import train

step_fn = train.Trainer.train_step


def train_step(self, *args):
    if self.pos.global_step + 1 == 3:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return step_fn(self, *args)


train.Trainer.train_step = train_step
sys.exit(train.main())
"""


def test_out_of_memory_is_one_line_with_the_levers_and_keeps_the_checkpoint(digits_root: Path, tmp_path: Path) -> None:
    """A CUDA out-of-memory error in step 3 (injected: there is no GPU here) after the step-2 save: exit 1, one line
    naming the global and micro batch and the levers, the step-2 checkpoint complete and loadable. Catches a raw
    traceback, a save attempted after the error (a half-written checkpoint becoming 'latest') or a zero exit."""
    driver, out = tmp_path / "driver.py", tmp_path / "run"
    driver.write_text(OOM_DRIVER)
    sets = ["--set", "train.micro_batch_size=16", "--set", "train.save_every_steps=2", "--set", "eval.data=null"]
    proc = run([sys.executable, str(driver), *small_run(digits_root, out, *sets)])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: rank 0: out of memory at train.global_batch_size=32, micro-batch 16 per rank; lower "
        "train.micro_batch_size (exact accumulation: same result), set model.grad_checkpointing=true, raise "
        "zero_optimization.stage or offload to CPU (zero_optimization.offload_optimizer / offload_param) in the "
        "DeepSpeed config; last good checkpoint: step00000002"
    )
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000002"
    assert (ckpt / "step00000002" / "complete.json").exists()
    assert not (ckpt / "step00000003").exists()
    assert all(torch.isfinite(v).all() for v in weights(out, "step00000002", tmp_path).values())


def checkpointing_worker(rank: int, world: int, root: str, out: str) -> dict:
    """A Trainer with ``model.grad_checkpointing=true``: both towers' flags; then a float64 copy of its model, the
    fastclip_v3 loss's gradient with checkpointing on and off, and how often the first block of each tower started
    (a pre-hook: checkpointing's recomputation stops early, before a forward hook would run)."""
    import copy

    from fastclip_ds.losses import build_loss

    with make_trainer(
        root, out, "openclip", None, "cpu_zero0_fp32", world, rank, "model.grad_checkpointing=true"
    ) as tr:
        model = tr.engine.module
        flags = [model.visual.transformer.grad_checkpointing, model.transformer.grad_checkpointing]
        images, tokens, keys = next(iter(tr.open_loader()))
    model = copy.deepcopy(model).double()
    calls = {"visual": 0, "text": 0}
    for tower, blocks in (("visual", model.visual.transformer.resblocks), ("text", model.transformer.resblocks)):
        blocks[0].register_forward_pre_hook(lambda *_, tower=tower: calls.__setitem__(tower, calls[tower] + 1))
    found = {"flags": flags}
    for on in (True, False):
        model.set_grad_checkpointing(on)
        loss_fn = build_loss({"name": "fastclip_v3"}, dataset_size=2000, steps_per_epoch=1, state_dtype=torch.float64)
        f = model(image=images.double(), text=tokens)
        loss_fn(f["image_features"], f["text_features"], f["logit_scale"], keys)["loss"].backward()
        found[on] = {n: p.grad.clone() for n, p in model.named_parameters()}
        found[on, "calls"] = dict(calls)
        calls.update(visual=0, text=0)
        model.zero_grad()
    return found


def test_grad_checkpointing_is_set_on_both_towers_and_keeps_the_gradient(digits_root: Path, tmp_path: Path) -> None:
    """``model.grad_checkpointing`` reaches both towers of the trainer's model; with it each tower's first block runs
    twice per forward+backward (recomputed) instead of once, and the float64 gradients equal the unchecked ones to
    1e-12 relative. Catches the key set on one tower only, or not passed on at all."""
    (found,) = spawn(1, checkpointing_worker, (str(digits_root), str(tmp_path)), timeout=300)
    assert found["flags"] == [True, True]
    assert found[True, "calls"] == {"visual": 2, "text": 2} and found[False, "calls"] == {"visual": 1, "text": 1}
    for name, g in found[False].items():
        assert relative_error(found[True][name], g) <= 1e-12, name
