"""Local multi-process runs, for the tests, the benchmarks and the launchers.

:func:`free_port` is the rendezvous port every local launch uses; :func:`spawn` runs a function on K fresh gloo
ranks with ``deepspeed.comm`` initialised, under a timeout, and returns each rank's result (or raises with the
failing rank's traceback).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    try:
        # here, not at the top: the parent process (a launcher needing only free_port) never loads DeepSpeed
        import deepspeed

        from . import comm
        from .ds_compat import patch_deepspeed

        patch_deepspeed()
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        result = {"ok": fn(rank, world, *args)}
        comm.barrier("spawn_exit")
        deepspeed.comm.destroy_process_group()
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"{rank}.pt")


def spawn(world: int, fn: Callable[..., Any], args: tuple = (), timeout: float = 300.0) -> list[Any]:
    """``[fn(rank, world, *args) for each rank]``, run on ``world`` fresh gloo processes; ``fn`` must be importable."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, out_dir, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        if any(p.is_alive() for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            raise TimeoutError(f"spawn({world} ranks, {fn.__name__}): not finished after {timeout:.0f} s")
        results = []
        for rank, p in enumerate(procs):
            path = Path(out_dir) / f"{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"spawn: rank {rank} exited with code {p.exitcode} and no result")
            result = torch.load(path, weights_only=False)
            if "error" in result:
                raise RuntimeError(f"spawn: rank {rank} failed:\n{result['error']}")
            results.append(result["ok"])
        return results
