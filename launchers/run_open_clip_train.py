"""Run OpenCLIP's own trainer (``open_clip_train.main``) with this package's model configs registered.

Imports open_clip through ``fastclip_ds.compat`` first (the torchvision shim for CPU-only torch) and registers
``fastclip-tiny`` / ``fastclip-micro`` so that ``--model fastclip-tiny`` resolves. Arguments are open_clip_train's;
``@FILE`` expands to FILE's lines, one argument each (torchrun rejects ``--logs`` as an ambiguous abbreviation of
its own ``--logs-specs``, so pass open_clip_train's arguments in a file). open_clip_train imports pandas at
module level only for its CSV dataset; where pandas is not installed, a placeholder that fails on first use stands
in for it (webdataset training never touches it). Without CUDA, its ``DistributedDataParallel(model,
device_ids=[cpu])`` is rejected by torch, so on CPU the wrapper drops ``device_ids`` (CPU DDP takes none).
webdataset >= 1.0 ends every shard's file stream with an empty end-of-shard marker that open_clip_train's
``group_by_keys_nothrow`` (written for webdataset 0.2) cannot read (``KeyError: 'fname'``); the wrapper drops
those markers before it, which is what webdataset 0.2 streams looked like::

    torchrun --nproc_per_node 2 launchers/run_open_clip_train.py @args.txt
"""

import importlib.machinery
import importlib.util
import runpy
import sys
import types
from pathlib import Path

from fastclip_ds.model import open_clip_with_configs


def expand(argv: list[str]) -> list[str]:
    """``@FILE`` items replaced by the non-empty lines of FILE."""
    out = []
    for arg in argv:
        if arg.startswith("@"):
            out += [line for line in Path(arg[1:]).read_text().splitlines() if line]
        else:
            out.append(arg)
    return out


class _MissingPandas(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):  # introspection (hasattr(m, "__file__") ...) must see a plain missing attribute
            raise AttributeError(name)
        raise ImportError(f"pandas.{name}: pandas is not installed (open_clip_train's csv dataset needs it)")


def _cpu_ddp() -> None:
    """Make ``DistributedDataParallel(m, device_ids=[cpu])`` mean plain CPU DDP (torch wants ``device_ids=None``)."""
    import torch

    base = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(base):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP


def _drop_shard_markers() -> None:
    """Filter webdataset 1.x's empty end-of-shard dicts out of open_clip_train's sample grouping."""
    import open_clip_train.data as oc_data

    group = oc_data.group_by_keys_nothrow

    def grouped(data, *args, **kwargs):
        return group((s for s in data if s), *args, **kwargs)

    oc_data.group_by_keys_nothrow = grouped


def prepare() -> None:
    """Make open_clip_train importable and runnable here: pandas placeholder, our model configs, CPU DDP, markers."""
    if importlib.util.find_spec("pandas") is None and "pandas" not in sys.modules:
        sys.modules["pandas"] = placeholder = _MissingPandas("pandas")
        placeholder.__spec__ = importlib.machinery.ModuleSpec("pandas", None)
    open_clip_with_configs()
    import torch

    if not torch.cuda.is_available():
        _cpu_ddp()
    _drop_shard_markers()


if __name__ == "__main__":
    prepare()
    sys.argv = ["open_clip_train.main", *expand(sys.argv[1:])]
    runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)
