"""LiT (``model.lock_image`` / ``model.lock_text``, open_clip's meanings) on real DeepSpeed engines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastclip_ds import digits, train
from fastclip_ds.config import default_config
from fastclip_ds.model import create_model, lock_towers
from fastclip_ds.multiproc import spawn

LOCKS = default_config()["model"]  # every lock off


def lit_worker(rank: int, world: int, root: str, out: str, stage: int) -> dict:
    """Train fastclip-micro with ``model.lock_image`` for 3 steps on a real engine at ZeRO ``stage`` (fp32); report
    which image-tower tensors changed, what the optimizer holds, and which text-tower tensors changed."""
    from fastclip_ds.config import load_config, validate
    from fastclip_ds.engine import build_ds_config

    sets = [
        f"data.train={digits.train_pattern(Path(root))}",
        "data.num_workers=0",
        "model.config=fastclip-micro",
        "model.lock_image=true",
        "train.global_batch_size=32",
        "train.max_steps=3",
        "train.warmup_steps=1",
        "eval.data=null",
        f"train.output_dir={out}",
    ]
    cfg = load_config(None, sets)
    validate(cfg, world)
    ds_config = build_ds_config(
        {"zero_optimization": {"stage": stage}, "gradient_clipping": 1.0},
        "<test>",
        global_batch=32,
        world_size=world,
        on_cuda=False,
    )
    with train.Trainer(cfg, ds_config, Path(out), rank, world) as trainer:
        model = trainer.engine.module
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for step, (images, tokens, keys) in enumerate(trainer.open_loader()):
            assert trainer.train_step(images, tokens, keys).outcome == train.APPLIED
            if step == 2:
                break
        end = model.state_dict()
        visual = [k for k in start if k.startswith("visual.")]
        text = [k for k in start if not k.startswith("visual.") and k != "logit_scale"]
        visual_ids = {id(p) for n, p in model.named_parameters() if n.startswith("visual.")}
        optimizer = trainer.engine.optimizer
        if stage == 0:
            held = [p for group in optimizer.param_groups for p in group["params"]]
            state_numel = sum(s["exp_avg"].numel() for s in optimizer.state.values())
        else:
            held = [p for group in optimizer.bit16_groups for p in group]
            state_numel = sum(s["exp_avg"].numel() for s in optimizer.optimizer.state.values())
        return {
            "visual_changed": [k for k in visual if not torch.equal(start[k], end[k])],
            "visual_grads": [n for n, p in model.named_parameters() if n.startswith("visual.") and p.grad is not None],
            "visual_held": sum(id(p) in visual_ids for p in held),
            "held_numel": sum(p.numel() for p in held),
            "trainable_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "visual_numel": sum(start[k].numel() for k in visual),
            "state_numel": state_numel,
            "text_changed": sum(not torch.equal(start[k], end[k]) for k in text),
            "text": len(text),
        }


@pytest.mark.parametrize(("stage", "world"), [(0, 1), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_lock_image_freezes_the_image_tower_in_the_engine(
    digits_root: Path, tmp_path: Path, stage: int, world: int
) -> None:
    """After 3 applied steps with ``model.lock_image`` every image-tower tensor is bit-identical to the start on every
    rank, none has a gradient, the optimizer (ZeRO-0: torch AdamW; ZeRO-2 on 2 ranks: DeepSpeed's flat fp32
    partitions) holds none of them and its Adam state (summed over the ranks' partitions) covers only the trainable
    numel, and the text tower changed. Catches locked parameters left
    in the optimizer (weight decay or ZeRO's partition update would still move them, and their state would cost
    memory) and a lock applied after the optimizer was built."""
    ranks = spawn(world, lit_worker, (str(digits_root), str(tmp_path), stage), timeout=300)
    for r in ranks:
        assert r["visual_changed"] == [] and r["visual_grads"] == [] and r["visual_held"] == 0
        assert r["held_numel"] == r["trainable_numel"]
        assert r["text_changed"] == r["text"]
    # ZeRO pads its flat partitions to an alignment far below the image tower's size
    state, (r, *_) = sum(x["state_numel"] for x in ranks), ranks
    assert r["trainable_numel"] <= state < r["trainable_numel"] + r["visual_numel"] // 2


def test_lock_options_follow_open_clip() -> None:
    """``lock_image_unlocked_groups=1`` leaves open_clip's last image layer group trainable (for the micro ViT in
    open_clip 3.3: the projection ``proj``); ``lock_text`` freezes the whole text tower and nothing else; open_clip's
    CLIP refuses trainable text LayerNorms, which is a one-line ValueError naming the key. Catches the options
    ignored or miswired (e.g. the image lock applied to the text tower)."""
    model = create_model("fastclip-micro", seed=0).model
    lock_towers(model, {**LOCKS, "lock_image": True, "lock_image_unlocked_groups": 1})
    trainable = {n for n, p in model.named_parameters() if n.startswith("visual.") and p.requires_grad}
    assert trainable == {"visual.proj"}
    model = create_model("fastclip-micro", seed=0).model
    lock_towers(model, {**LOCKS, "lock_text": True})
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(not n.startswith("visual.") and n != "logit_scale" for n in frozen)
    assert {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("visual.")} == {
        "logit_scale"
    }
    with pytest.raises(ValueError, match=r"^model\.lock_text_freeze_layer_norm: "):
        lock_towers(model, {**LOCKS, "lock_text": True, "lock_text_freeze_layer_norm": False})
