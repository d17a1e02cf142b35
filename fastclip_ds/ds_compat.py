"""Every use of DeepSpeed beyond its public API, in one module, for the versions it was tested with.

fastclip-ds reaches into DeepSpeed internals where the public API has no way to do what it needs:

- :func:`patch_deepspeed`: skip the JIT build of the CPU shared-memory comm op;
- :func:`comms_log`: the comms logger's records (bytes per step of DeepSpeed's own collectives);
- :func:`zero_partitions`: the ZeRO-1/2/3 partition bookkeeping, for LAMB's per-tensor trust ratios;
- :func:`partitioned`: which ZeRO-3 parameters are partitioned now (evaluation gathers them);
- :func:`universal_info` and :func:`universal_load`: universal-checkpoint tagging, and loading one on another
  number of ranks (this version's own loader fails at ZeRO 1/2 and mixes up parameter groups at ZeRO-3).

Any DeepSpeed release may rename or change these, so ``fastclip-ds train`` calls :func:`check_version` before
any process group: a DeepSpeed outside :data:`SUPPORTED` is a one-line error, not a failure deep inside a
resume. Widen the range only after the test suite passes on the new version. DeepSpeed is imported inside the
functions, so that the check itself runs on any version.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version
from torch import Tensor

from .config import ConfigError

SUPPORTED = ("0.19.8", "0.19.8")  # oldest and newest DeepSpeed release tested (inclusive; local tags ignored)


def installed_version() -> str:
    return metadata.version("deepspeed")


def check_version() -> None:
    """Raise a one-line :class:`ConfigError` unless the installed DeepSpeed release is within :data:`SUPPORTED`."""
    found = installed_version()
    low, high = (Version(v).release for v in SUPPORTED)
    try:
        ok = low <= Version(found).release <= high
    except InvalidVersion:
        ok = False
    if not ok:
        span = SUPPORTED[0] if SUPPORTED[0] == SUPPORTED[1] else f"{SUPPORTED[0]} to {SUPPORTED[1]}"
        raise ConfigError(
            f"DeepSpeed {found} is installed; fastclip-ds supports DeepSpeed {span} (it relies on internals "
            f"listed in fastclip_ds/ds_compat.py): pip install deepspeed=={SUPPORTED[1]}"
        )


def patch_deepspeed() -> None:
    """Skip the JIT build of DeepSpeed's shared-memory comm op on CPU (45-70 s, unused: gloo does the work).
    Call before the first ``deepspeed.init_distributed``; a no-op on other accelerators."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # `import deepspeed.comm.torch as m` would bind the real torch package; look it up by name.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def comms_log() -> dict[str, dict[int, list]]:
    """DeepSpeed's comms logger records, ``{log name: {message bytes: [count, ...]}}`` (mutable: clear it to
    restart); filled only when the DeepSpeed config enables ``comms_logger``."""
    from deepspeed.comm.comm import comms_logger

    return comms_logger.comms_dict


def partitioned(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Those ZeRO-3 ``params`` whose full value is not on this rank right now (gather them to read them)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [p for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]


@dataclass(frozen=True)
class ZeroPartition:
    """This rank's flat fp32 partition of one parameter group (a sub-group at ZeRO-3): the group's tensors lie
    back to back at ``offsets`` (``numels`` elements each) in a flat buffer of which this rank holds
    ``[start, start + size)`` (gaps are padding); ``group`` is the process group sharing those tensors."""

    flat: Tensor
    offsets: list[int]
    numels: list[int]
    start: int
    size: int
    group: Any


def zero_partitions(engine: Any) -> list[ZeroPartition] | None:
    """The flat partitions the engine's basic optimizer steps on at ZeRO 1-3; ``[]`` where it steps on whole
    parameters (no wrapper, or the ZeRO-0 fp16 wrapper); None for a wrapper whose layout is not known here."""
    import deepspeed.comm as dist
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    wrapper = engine.optimizer
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        parts = []
        for i, flat in enumerate(wrapper.single_partition_of_fp32_groups):
            group, size = wrapper.real_dp_process_group[i], wrapper.partition_size[i]
            numels = [m.numel() for m in wrapper.round_robin_bit16_meta[i]]
            start = dist.get_rank(group=group) * size
            parts.append(ZeroPartition(flat, wrapper.round_robin_bit16_offsets[i], numels, start, size, group))
        return parts
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        parts = []
        for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
            numels = [t.ds_numel for t in wrapper.fp16_partitioned_groups[i]]
            offsets = [0, *itertools.accumulate(numels)][:-1]
            parts.append(ZeroPartition(flat, offsets, numels, 0, sum(numels), wrapper.sub_group_process_groups[i]))
        return parts
    if wrapper is engine.basic_optimizer or isinstance(wrapper, FP16_UnfusedOptimizer):
        return []
    return None


def universal_info() -> dict[str, Any]:
    """Client state that marks a save as convertible by ``deepspeed.checkpoint.ds_to_universal``."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


@contextmanager
def universal_load(engine: Any, tag_dir: Path) -> Iterator[bool]:
    """Around ``engine.load_checkpoint`` of the universal checkpoint ``tag_dir`` (a different world size): yields
    its ``load_optimizer_states``. At ZeRO 1/2 DeepSpeed loads module, scheduler and client state, then
    :func:`_load_zero12_optimizer` the optimizer; at ZeRO-3 DeepSpeed loads all (``checkpoint.load_universal`` in
    its config), then :func:`_repair_zero3_load` undoes its faults."""
    groups = engine.optimizer.optimizer.param_groups
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    zero12 = engine.zero_optimization_stage() in (1, 2)
    yield not zero12
    if zero12:
        _load_zero12_optimizer(engine, tag_dir / "zero")
    else:
        _repair_zero3_load(engine, groups, settings)


def _load_zero12_optimizer(engine: Any, folder: Path) -> None:
    """This rank's ZeRO-1/2 fp32 master fragments and optimizer states from a universal checkpoint's ``zero/``.

    DeepSpeed 0.19.8's own universal loader fails (``IndexError`` on ``steps[0]``) on a rank that holds no
    element of a parameter group, which a one-element group (``logit_scale``) always causes on >= 2 ranks.
    This does the same per-parameter loads through DeepSpeed's fragment mappings and skips such groups."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    opt = engine.optimizer
    saved = torch.load(folder / "optimizer_state.pt", weights_only=False)
    opt._load_global_state(saved)
    for i, (group, saved_group) in enumerate(zip(opt.optimizer.param_groups, saved["param_groups"], strict=True)):
        owned = [lp for lp in opt.bit16_groups[i] if lp._hp_mapping is not None]
        steps = {lp.load_hp_checkpoint_state(str(folder / opt.param_names[lp]), 0, 1) for lp in owned}
        if owned:
            flat = group["params"][0]
            if steps - {None}:
                opt.optimizer.state[flat]["step"] = (steps - {None}).pop()
            keys = {k for lp in owned for k in lp._hp_mapping.get_optim_state_keys()}
            map_to_flat_opt_states(flat, opt.bit16_groups[i], opt.optimizer.state, keys)
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def _repair_zero3_load(engine: Any, groups: list[dict], settings: list[dict[str, Any]]) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal loader: it gives every parameter group the first
    group's settings (weight decay, lr), and one ``step`` tensor to every group's state, which each group's
    optimizer step then increments (wrong Adam bias corrections from the second group on)."""
    for group, own in zip(groups, settings, strict=True):
        group.update(own)
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    engine.lr_scheduler.load_state_dict(engine.lr_scheduler.state_dict())  # this step's lrs, per group
