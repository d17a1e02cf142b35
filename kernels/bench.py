"""Micro-benchmark: forward + backward of a whole single-process loss per implementation.

    python -m fastclip_kernels.bench --device cpu --batch 8192 --dim 512 --impl chunked,dense,openclip

Implementations: ``chunked``, ``dense``, ``triton`` (this package, through ``clip_loss`` or
``fastclip_surrogate``, which calls the kernels exactly as the training loss ``FastClipLoss`` does) and
``openclip`` (open_clip's ``ClipLoss``, the peer; it always computes the CLIP loss, also under ``--loss
fastclip``). Reported per (impl, B, d): median milliseconds (CUDA: ``triton.testing.do_bench``, CUDA
events, warm-up, L2 flushed before each run; CPU: wall clock, impls interleaved), achieved TFLOP/s counted
as ``GEMM_EQUIVALENTS[loss]`` B×B×d products (:func:`step_flops`), that rate as % of a B×d @ d×B matmul
timed the same way (bfloat16 on CUDA: % of the card's practical peak), the cost model's predicted time
(``schedule``) on an H100 and an H200, and peak memory beyond the inputs:
on CUDA ``max_memory_allocated`` minus the allocation before the step; on CPU the high-water mark
of bytes allocated through torch's CPU allocator during one step (replayed from the profiler's
allocation events, ``profile_memory=True``): tensor bytes, comparable to the CUDA number, not RSS.
Both include the two feature-gradient tensors the step produces.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import clip_loss, fastclip_surrogate, openclip_import, schedule, triton_module

IMPLS = ("chunked", "dense", "triton", "openclip")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# GEMM-equivalents of one step as the dense impl computes it. clip: the forward S = x @ y.T, then block_grads
# recomputes S and forms dx = G @ y and dy = G.T @ x (the openclip peer does 6: its rate is in useful work).
# fastclip (the training loss's calls): row statistics of S and of S.T, then per side S again and G @ other side.
GEMM_EQUIVALENTS = {"clip": 4, "fastclip": 6}
CSV_COLUMNS = ["impl", "B", "d", "device", "ms", "tflops", "peak_mem_bytes"]
MODEL_IMPLS = {"triton": "triton", "chunked": "chunked"}  # bench impl -> schedule impl
EXTRA_COLUMNS = [
    "dtype",
    "loss",
    "cpu_ms",
    "pct_matmul",
    "matmul_tflops",
    "time_vs_openclip",
    "mem_vs_openclip",
    "status",
    "model_h100_ms",
    "model_h200_ms",
]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected integers >= 2, got {text!r}")
    return values


def _impl_list(text: str) -> list[str]:
    impls = [v for v in text.split(",") if v]
    bad = [v for v in impls if v not in IMPLS]
    if bad or not impls:
        raise argparse.ArgumentTypeError(f"unknown impl {bad or text!r}; choose from {','.join(IMPLS)}")
    return impls


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastclip_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=_int_list, default=[8192], help="comma-separated B values")
    p.add_argument("--dim", type=_int_list, default=[512], help="comma-separated d values")
    p.add_argument("--impl", type=_impl_list, default=["chunked", "dense", "openclip"], help=",".join(IMPLS))
    p.add_argument("--loss", choices=["clip", "fastclip"], default="clip")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=5, help="timed forward+backward steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--csv", type=Path, help="write one row per (impl, B, d)")
    p.add_argument("--markdown", type=Path, help="write a markdown table")
    p.add_argument("--plot", type=Path, help="write a PNG (time and memory vs B)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    if "triton" in args.impl and args.device != "cuda":
        p.error("--impl triton needs --device cuda (on CPU it would run in the Triton interpreter)")
    if "triton" in args.impl and triton_module() is None:
        p.error("--impl triton: triton does not import")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def import_open_clip():
    """open_clip through the torchvision shim (``openclip_import``), or None if it is not installed."""
    try:
        return openclip_import.import_open_clip()
    except ModuleNotFoundError:
        return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` between CUDA events, after ``warmup`` runs, with L2 flushed before each
    run (a 256 MiB buffer zeroed, as ``triton.testing.do_bench`` does), on the current device's stream."""
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def median_ms(fns: dict[str, Callable[[], object]], device: str, repeats: int, warmup: int) -> dict:
    """Median (wall, process-CPU) milliseconds per function.

    CUDA: :func:`cuda_ms` (CUDA events, ``warmup`` runs first, L2 flushed before each timed run). CPU:
    wall clock, the functions interleaved so that load from other jobs on the machine hits all alike; CPU
    time (all threads) shows how much of it was spent computing.
    """
    if device == "cuda":
        return {name: (cuda_ms(fn, repeats, warmup), math.nan) for name, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_timed(fn))
    return {name: tuple(statistics.median(col) for col in zip(*v, strict=True)) for name, v in samples.items()}


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """High-water mark of torch CPU-allocator bytes allocated while ``fn`` runs (profiler allocation events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            sizes.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    if device == "cpu":
        return cpu_peak_bytes(fn)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def make_step(impl: str, loss: str, b: int, d: int, dtype: torch.dtype, device: str) -> Callable[[], None]:
    """A closure running one forward + backward on fresh unit-norm features (grads reset each call)."""
    gen = torch.Generator(device=device).manual_seed(0)
    feats = [torch.randn(b, d, generator=gen, device=device) for _ in range(2)]
    x, y = (torch.nn.functional.normalize(f, dim=-1).to(dtype).requires_grad_() for f in feats)
    temp = torch.tensor([0.07], device=device, requires_grad=True)  # τ; the CLIP multiplier is 1/τ
    log_u = torch.zeros(b, device=device)
    if impl == "openclip":
        open_clip = import_open_clip()
        peer = open_clip.ClipLoss()

        def forward():
            return peer(x, y, 1.0 / temp)
    elif loss == "clip":

        def forward():
            return clip_loss(x, y, 1.0 / temp, impl=impl)
    else:

        def forward():
            return fastclip_surrogate(x, y, log_u, log_u, temp, 1e-6, impl=impl)

    def step() -> None:
        x.grad = y.grad = temp.grad = None
        forward().backward()

    return step


def step_flops(b: int, d: int, loss: str = "clip") -> int:
    """FLOPs counted for one forward + backward step of ``loss`` at batch ``b``, dim ``d`` (2·B²·d per GEMM-eq.)."""
    return GEMM_EQUIVALENTS[loss] * 2 * b * b * d


def matmul_step(b: int, d: int, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """A B×d @ d×B product, the rate reference (2·B²·d FLOPs); bfloat16 on CUDA whatever the run's dtype."""
    dtype = torch.bfloat16 if device == "cuda" else dtype
    a = torch.randn(b, d, device=device).to(dtype)
    c = torch.randn(d, b, device=device).to(dtype)
    return lambda: a @ c


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} torch threads"


def _oom(err: Exception) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def measure(b: int, d: int, impls: list[str], args: argparse.Namespace) -> list[dict]:
    """Rows for one (B, d): each impl's peak memory over one step, then all steps and the matmul timed, and
    the cost model's prediction for the Triton and chunked rows.

    An impl whose step runs out of memory gets ``status`` "oom" and NaN times.
    """
    dtype = DTYPES[args.dtype]
    rows, steps = [], {"matmul": matmul_step(b, d, dtype, args.device)}
    for impl in impls:
        row = {"impl": impl, "B": b, "d": d, "device": args.device, "dtype": args.dtype, "loss": args.loss}
        row.update(ms=math.nan, cpu_ms=math.nan, peak_mem_bytes=-1, status="ok")
        try:
            step = make_step(impl, args.loss, b, d, dtype, args.device)
            row["peak_mem_bytes"] = peak_bytes(step, args.device)
            steps[impl] = step
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _oom(err):
                raise
            row["status"] = "oom"
        if args.device == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    times = median_ms(steps, args.device, args.repeats, args.warmup)
    mm = 2 * b * b * d / (times["matmul"][0] * 1e-3) / 1e12
    peer = next((r for r in rows if r["impl"] == "openclip" and r["status"] == "ok"), None)
    for r in rows:
        r["ms"], r["cpu_ms"] = times.get(r["impl"], (math.nan, math.nan))
    for r in rows:
        r["tflops"] = step_flops(b, d, args.loss) / (r["ms"] * 1e-3) / 1e12
        for hw in (schedule.H100, schedule.H200):
            model = MODEL_IMPLS.get(r["impl"])
            t = schedule.step_time(model, b, d, str(dtype).removeprefix("torch."), hw, args.loss) if model else math.nan
            r[f"model_{hw.name.split()[0].lower()}_ms"] = t * 1e3
        r["matmul_tflops"], r["pct_matmul"] = mm, 100 * r["tflops"] / mm
        r["time_vs_openclip"] = r["ms"] / peer["ms"] if peer else math.nan
        r["mem_vs_openclip"] = r["peak_mem_bytes"] / peer["peak_mem_bytes"] if peer else math.nan
        print(_progress(r), file=sys.stderr, flush=True)
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """One row per (B, d, impl), with the matmul rate and the ratios to the ``openclip`` row."""
    impls = list(args.impl)
    if "openclip" in impls and import_open_clip() is None:
        print("open_clip is not installed: skipping the openclip peer", file=sys.stderr)
        impls.remove("openclip")
    return [row for b in args.batch for d in args.dim for row in measure(b, d, impls, args)]


def _progress(r: dict) -> str:
    return (
        f"{r['impl']:>8} B={r['B']} d={r['d']}: {r['ms']:.1f} ms, {r['tflops']:.3f} TFLOP/s "
        f"({r['pct_matmul']:.0f}% of matmul), peak {r['peak_mem_bytes'] / 2**20:.1f} MiB [{r['status']}]"
    )


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS + EXTRA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    head = [
        f"Device: {device_name(args.device)}; torch {torch.__version__}; {args.dtype}; loss `{args.loss}`; "
        f"median of {args.repeats} forward+backward steps after {args.warmup} warm-up "
        f"({'CUDA events, L2 flushed before each' if args.device == 'cuda' else 'impls and the matmul interleaved'}); "
        f"{datetime.date.today().isoformat()}.",
        "CPU ms: process CPU time of a step, all threads (includes OpenMP spin-waits when threads > 1).",
        f"TFLOP/s counts {GEMM_EQUIVALENTS[args.loss] * 2}·B²·d ({GEMM_EQUIVALENTS[args.loss]} GEMM-equivalents); "
        f"% matmul is against a B×d @ d×B {'bfloat16' if args.device == 'cuda' else args.dtype} matmul timed the "
        "same way. Model: `fastclip_kernels.schedule`'s predicted step time on an H100 / H200 (this dtype).",
        "",
        "| impl | B | d | ms | CPU ms | TFLOP/s | % matmul | peak MiB | time × openclip | memory × openclip "
        "| model H100 ms | model H200 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    body = [
        f"| {r['impl']} | {r['B']} | {r['d']} | {r['ms']:.1f} | {r['cpu_ms']:.1f} | {r['tflops']:.3f} | "
        f"{r['pct_matmul']:.0f} | {r['peak_mem_bytes'] / 2**20:.1f} | {r['time_vs_openclip']:.2f} | "
        f"{r['mem_vs_openclip']:.3f} | {r['model_h100_ms']:.2f} | {r['model_h200_ms']:.2f} |"
        for r in rows
    ]
    dtype = str(DTYPES[args.dtype]).removeprefix("torch.")
    models = [schedule.report(b, d, dtype, args.loss) for b in args.batch for d in args.dim]
    return "\n".join(head + body) + "\n\n" + "\n".join(models)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, d in sorted({(r["impl"], r["d"]) for r in rows}):
        pts = sorted((r["B"], r["ms"], r["peak_mem_bytes"] / 2**20) for r in rows if (r["impl"], r["d"]) == (impl, d))
        bs = [p[0] for p in pts]
        ax_t.plot(bs, [p[1] for p in pts], "o-", label=f"{impl} d={d}")
        ax_m.plot(bs, [p[2] for p in pts], "o-", label=f"{impl} d={d}")
    for ax, label in ((ax_t, "forward+backward (ms)"), (ax_m, "peak memory beyond inputs (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="batch B", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    table = markdown(rows, args)
    print(table)
    if args.csv:
        write_csv(rows, args.csv)
    if args.markdown:
        args.markdown.write_text(table)
    if args.plot:
        plot(rows, args.plot, f"{device_name(args.device)} · {args.dtype} · {args.loss}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
