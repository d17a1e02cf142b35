"""Import torchvision / open_clip on the CPU stack (the one torchvision shim of the project).

torchvision 0.28.0 exists only as a CUDA build whose C++ ops do not load beside a CPU torch; its
``_meta_registrations`` then fails on two unguarded fake-kernel registrations. Declaring the
operator schemas (no kernels) lets the Python layer import; CLIP never calls those ops. Both
functions are plain imports where nothing needs fixing. Needs torch alone at import time.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

_TV_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it drops the schemas


def import_torchvision() -> ModuleType:
    """Import torchvision, declaring the ``nms``/``qnms`` schemas its CPU import needs if missing."""
    global _TV_LIBRARY
    try:
        import torchvision

        return torchvision
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "open_clip")]:
        del sys.modules[name]
    _TV_LIBRARY = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TV_LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")


def import_open_clip() -> ModuleType:
    """``import open_clip`` after making torchvision importable (ModuleNotFoundError if either is missing)."""
    import_torchvision()
    return importlib.import_module("open_clip")
