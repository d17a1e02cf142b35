"""open_clip on the CPU stack (torch 2.13 CPU beside torchvision 0.28, a CUDA-only build).

Call :func:`import_open_clip` instead of ``import open_clip``. The torchvision shim it applies lives in
:mod:`fastclip_kernels.openclip_import` (the kernels import with torch alone, so it cannot live here); a plain
import where nothing needs fixing. DeepSpeed workarounds are in :mod:`fastclip_ds.ds_compat`.
"""

from fastclip_kernels.openclip_import import import_open_clip

__all__ = ["import_open_clip"]
