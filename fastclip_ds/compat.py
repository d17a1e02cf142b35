"""Workarounds for the CPU stack (torch 2.13 CPU + torchvision 0.28 CUDA build + DeepSpeed 0.19.8).

Call :func:`import_open_clip` instead of ``import open_clip`` and :func:`patch_deepspeed`
before the first ``deepspeed.init_distributed``. Both are no-ops where nothing needs fixing.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

_TV_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it drops the schemas


def import_torchvision() -> ModuleType:
    """Import torchvision, declaring the ``nms``/``qnms`` schemas its CPU import needs if missing.

    torchvision 0.28.0 exists only as a CUDA build whose C++ ops do not load beside a CPU torch;
    its ``_meta_registrations`` then fails on two unguarded fake-kernel registrations. Declaring
    the operator schemas (no kernels) lets the Python layer import; CLIP never calls those ops.
    """
    global _TV_LIBRARY
    try:
        import torchvision

        return torchvision
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _TV_LIBRARY = torch.library.Library("torchvision", "DEF")
    _TV_LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")


def import_open_clip() -> ModuleType:
    """``import open_clip`` after making torchvision importable."""
    import_torchvision()
    return importlib.import_module("open_clip")


def patch_deepspeed() -> None:
    """Skip the JIT build of DeepSpeed's shared-memory comm op on CPU (45-70 s, unused: gloo does the work)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # `import deepspeed.comm.torch as m` would bind the real torch package; look it up by name.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
