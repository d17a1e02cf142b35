"""``fastclip-ds bench-memory``: peak memory per rank of one training step against the micro-batch (exact
accumulation, ``train.micro_batch_size``) and activation checkpointing (``model.grad_checkpointing``), with
samples/s, at a fixed global batch; CSV, markdown and PNG.

Every setting runs in a fresh process on one rank: a :class:`~fastclip_ds.train.Trainer` (real DeepSpeed engine,
the default DeepSpeed config: ZeRO-2, fp32 on CPU, bf16 on GPU) takes a warm-up step on a synthetic batch
(parameters, gradients and optimizer state are then allocated), then the measured step, through
``Trainer.train_step``. The step's peak beyond what it starts with:

* CUDA: ``torch.cuda.max_memory_allocated`` over the step minus ``memory_allocated`` before it;
* CPU: the kernel's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` right before
  the step) minus the resident set before it. glibc's mmap threshold is fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``)
  so every freed tensor above it goes back to the OS: the warm-up step's peak does not hide the measured one's.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .multiproc import free_port

FIELDS = ("loss", "micro_batch", "accumulation", "checkpointing", "peak_mb", "start_mb", "step_s", "samples_per_s")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_memory() -> None:
    """Hand glibc's free heap memory back to the OS, so the next step's growth starts from what is really in use."""
    gc.collect()
    if not torch.cuda.is_available():
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _step(trainer: Any, batch: int, size: int, context: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, size, size, generator=gen)
    tokens = torch.randint(1, 1000, (batch, context), generator=gen)
    trainer.train_step(images, tokens, torch.arange(batch))


def measure(
    loss: str, model: str, global_batch: int, micro_batches: list[int], checkpointing: bool
) -> list[dict[str, Any]]:
    """One (loss, checkpointing) group in this process (world size 1), micro-batches smallest first: per setting the
    measured step's peak growth and start memory (MB) and its time."""
    import deepspeed

    from . import train
    from .config import check_environment, load_config, validate
    from .ds_compat import patch_deepspeed
    from .engine import build_ds_config, load_ds_config

    train.distributed_env()
    patch_deepspeed()
    on_cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", verbose=False)
    rows = []
    for micro in sorted(micro_batches):
        sets = [f"loss.name={loss}", f"model.config={model}", f"train.global_batch_size={global_batch}"]
        sets += ["eval.data=null", "train.warmup_steps=0"]  # a big batch on the digits demo is a run of few steps
        sets += [f"train.micro_batch_size={micro}", f"model.grad_checkpointing={json.dumps(checkpointing)}"]
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = load_config(None, [*sets, f"train.output_dir={run_dir}"])
            validate(cfg, 1)
            check_environment(cfg)
            user, source = load_ds_config(None, on_cuda)
            ds_config = build_ds_config(
                user, source, global_batch=global_batch, world_size=1, on_cuda=on_cuda, micro_batch=micro
            )
            with train.Trainer(cfg, ds_config, Path(run_dir), 0, 1) as trainer:
                size = trainer.bundle.config["vision_cfg"]["image_size"]
                context = trainer.bundle.config["text_cfg"]["context_length"]
                accumulation = global_batch // micro
                _step(trainer, 2 * accumulation, size, context)  # warm-up: gradients, optimizer state allocated
                _release_free_memory()
                if on_cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    start = torch.cuda.memory_allocated()
                else:
                    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
                    start = _status_kb("VmRSS") * 1024
                began = time.perf_counter()
                _step(trainer, global_batch, size, context)
                if on_cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - began
                peak = torch.cuda.max_memory_allocated() if on_cuda else _status_kb("VmHWM") * 1024
        rows.append(
            {
                "loss": loss,
                "micro_batch": micro,
                "accumulation": accumulation,
                "checkpointing": checkpointing,
                "peak_mb": (peak - start) / 2**20,
                "start_mb": start / 2**20,
                "step_s": seconds,
                "samples_per_s": global_batch / seconds,
            }
        )
        del trainer
        _release_free_memory()
    return rows


def run_group(loss: str, model: str, global_batch: int, micro_batches: list[int], checkpointing: bool) -> Any:
    """:func:`measure` in a fresh process (no group inherits another's allocator state); returns the process."""
    spec = json.dumps([loss, model, global_batch, micro_batches, checkpointing])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "PYTHONWARNINGS": "ignore"}
    env.update(MASTER_PORT=str(free_port()))
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "fastclip_ds.memory_bench", "--one", spec]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc: Any) -> list[dict[str, Any]]:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"bench-memory {proc.args[-1]} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per loss, peak memory and step time relative to the whole batch at once without checkpointing."""
    for row in rows:
        base = next(r for r in rows if r["loss"] == row["loss"] and r["accumulation"] == 1 and not r["checkpointing"])
        row["peak_ratio"] = row["peak_mb"] / base["peak_mb"]
        row["time_ratio"] = row["step_s"] / base["step_s"]


def markdown(rows: list[dict[str, Any]], global_batch: int, device: str) -> str:
    head = (
        f"Peak memory of one training step beyond its start (parameters, gradients, optimizer state), global batch "
        f"{global_batch}, {device}; ratios against the whole batch at once without checkpointing (same loss).\n\n"
        "| loss | micro-batch | accumulation | checkpointing | peak MB | peak ratio | step s | time ratio "
        "| samples/s |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['loss']} | {r['micro_batch']} | {r['accumulation']} | {'on' if r['checkpointing'] else 'off'} | "
        f"{r['peak_mb']:.1f} | {r['peak_ratio']:.3f} | {r['step_s']:.2f} | {r['time_ratio']:.2f} | "
        f"{r['samples_per_s']:.1f} |\n"
        for r in rows
    )
    return head + body


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4))
    for loss in dict.fromkeys(r["loss"] for r in rows):
        for ckpt in (False, True):
            sel = [r for r in rows if r["loss"] == loss and r["checkpointing"] == ckpt]
            label = f"{loss}, checkpointing {'on' if ckpt else 'off'}"
            style = "--" if ckpt else "-"
            micro = [r["micro_batch"] for r in sel]
            mem.plot(micro, [r["peak_mb"] for r in sel], style, marker="o", label=label)
            speed.plot(micro, [r["samples_per_s"] for r in sel], style, marker="o", label=label)
    for ax, ylabel in ((mem, "step peak beyond start (MB)"), (speed, "samples/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("micro-batch per rank")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    mem.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastclip-ds bench-memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fastclip-tiny", help="model name or config JSON (default fastclip-tiny)")
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8], help="micro-batch = global batch / split")
    p.add_argument("--losses", nargs="+", default=["openclip", "fastclip_v3"])
    p.add_argument("--out", default="bench_memory", help="directory for memory.csv, memory.md, memory.png")
    p.add_argument("--jobs", type=int, default=2, help="(loss, checkpointing) groups measured at the same time")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting, as JSON, in this process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))), flush=True)
        return 0
    bad = [s for s in args.splits if s < 1 or args.global_batch % s]
    if bad:
        p.error(f"--splits {bad[0]} does not divide --global-batch {args.global_batch}")
    micro_batches = [args.global_batch // split for split in args.splits]
    groups = [(loss, ckpt) for loss in args.losses for ckpt in (False, True)]
    rows: list[dict[str, Any]] = []
    for i in range(0, len(groups), args.jobs):  # ``--jobs`` groups at a time: memory is per process
        procs = [
            run_group(loss, args.model, args.global_batch, micro_batches, ckpt)
            for loss, ckpt in groups[i : i + args.jobs]
        ]
        for proc in procs:
            rows.extend(collect(proc))
            print(json.dumps(rows[-len(micro_batches) :]), flush=True)
    rows.sort(key=lambda r: (args.losses.index(r["loss"]), r["checkpointing"], -r["micro_batch"]))
    add_ratios(rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "memory.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*FIELDS, "peak_ratio", "time_ratio"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "memory.md").write_text(markdown(rows, args.global_batch, device))
    plot(rows, out / "memory.png", f"{args.model}, global batch {args.global_batch}, {device}")
    print(markdown(rows, args.global_batch, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
