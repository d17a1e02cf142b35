"""Train a list of losses x seeds with everything else identical; write a table (markdown + CSV) and a plot.

Default: the digits demo on 2 CPU ranks (torchrun) at global batch 32, every loss, seeds 0 1 2::

    python launchers/experiments.py --out docs/results/digits_b32

Each run trains with the same run config (``--config`` + ``--set``), global batch, epochs (so samples seen) and
seed list; only ``loss.name`` and the per-label ``--loss-set`` overrides differ. A label may name a variant of a
loss (``v3_rho6=fastclip_v3`` with ``--loss-set v3_rho6:loss.rho=6``). Zero-shot eval runs every
``--eval-every`` steps (default: one epoch) and at the end. Finished runs (``eval.json`` present) are reused,
so an interrupted sweep resumes. The same command drives real data on GPUs::

    python launchers/experiments.py --out results/cc3m --config recipes/cc3m_rn50_8x128.json \\
        --deepspeed_config ds_configs/gpu_zero2_bf16.json --launcher deepspeed --nproc 8 --losses openclip,fastclip_v3

Outputs in ``--out``: ``runs/<label>_s<seed>/`` (run dirs + ``train.log`` + ``runner.json``; ``--runs-dir`` moves
them), ``results.csv``
(one row per run), ``curves.csv`` (top-1 per eval step), ``summary.md`` (mean ± std over seeds), ``top1.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastclip_ds.config import ConfigError, load_config, validate
from fastclip_ds.losses import CHOICES
from fastclip_ds.multiproc import free_port

ALL_LOSSES = CHOICES["name"]
METRICS = ("top1", "top5", "mean_per_class_recall", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def parse_labels(text: str) -> dict[str, str]:
    """``openclip,v3=fastclip_v3`` -> ``{label: loss name}`` (a bare name is its own label)."""
    labels: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        label, _, loss = item.partition("=")
        loss = loss or label
        if loss not in ALL_LOSSES:
            raise ValueError(f"--losses: {loss!r} is not one of {', '.join(ALL_LOSSES)}")
        if label in labels:
            raise ValueError(f"--losses: label {label!r} given twice")
        labels[label] = loss
    if not labels:
        raise ValueError("--losses: empty list")
    return labels


def parse_loss_sets(items: list[str], labels: dict[str, str]) -> dict[str, list[str]]:
    """``LABEL:key=value`` items -> ``{label: [key=value, ...]}``; only ``loss.*`` keys may differ per label."""
    out: dict[str, list[str]] = {label: [] for label in labels}
    for item in items:
        label, sep, override = item.partition(":")
        if not sep or label not in labels:
            raise ValueError(f"--loss-set {item!r}: expected LABEL:loss.key=value with LABEL in {', '.join(labels)}")
        if not override.startswith("loss.") or "=" not in override or override.startswith("loss.name="):
            raise ValueError(f"--loss-set {item!r}: only loss.* keys other than loss.name may differ between runs")
        out[label].append(override)
    return out


def launch_command(launcher: str, nproc: int, train_args: list[str]) -> list[str]:
    """The command that starts ``fastclip_ds.train`` on ``nproc`` local ranks with ``launcher``."""
    port = str(free_port())
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port]
        return [*head, "-m", "fastclip_ds.train", *train_args]
    if launcher == "deepspeed":
        head = ["deepspeed", "--num_gpus", str(nproc), "--master_port", port]
        return [*head, "--module", "fastclip_ds.train", *train_args]
    raise ValueError(f"--launcher: {launcher!r} is not one of torchrun, deepspeed")


def run_one(cmd: list[str], run_dir: Path, timeout: float) -> dict:
    """Run one training command; its log goes to ``run_dir/train.log``, wall time and exit code to runner.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    with (run_dir / "train.log").open("w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    info = {"command": cmd, "returncode": rc, "wall_s": time.perf_counter() - start}
    (run_dir / "runner.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_run(run_dir: Path) -> dict:
    """Final metrics, eval curve (samples seen, top-1), wall time and median train samples/s of one run dir."""
    cfg = json.loads((run_dir / "config.json").read_text())
    batch = cfg["train"]["global_batch_size"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}  # the final eval may repeat a periodic one
    speeds = [r["samples_per_s"] for r in records if r["kind"] == "train" and "samples_per_s" in r]
    runner = json.loads((run_dir / "runner.json").read_text()) if (run_dir / "runner.json").is_file() else {}
    return {
        "final": json.loads((run_dir / "eval.json").read_text()),
        "curve": [(step * batch, evals[step]["top1"]) for step in sorted(evals)],
        "wall_s": runner.get("wall_s", math.nan),
        "samples_per_s": statistics.median(speeds) if speeds else math.nan,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: dict[str, dict[int, dict]]) -> tuple[list[dict], str]:
    """Per-label mean ± std over seeds: rows (for tests and CSV) and a markdown table."""
    rows = []
    for label, by_seed in results.items():
        runs = list(by_seed.values())
        row = {"label": label, "seeds": len(runs)}
        for key in METRICS:
            if all(key in r["final"] for r in runs):
                row[key] = mean_std([r["final"][key] for r in runs])
        row["wall_s"] = mean_std([r["wall_s"] for r in runs])
        row["samples_per_s"] = mean_std([r["samples_per_s"] for r in runs])
        rows.append(row)
    keys = [k for k in METRICS if all(k in row for row in rows)]
    header = ["loss", *keys, "wall s", "train samples/s", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], *(f"{row[k][0]:.4f} ± {row[k][1]:.4f}" for k in keys)]
        wall, speed = row["wall_s"], row["samples_per_s"]
        cells += [f"{wall[0]:.0f} ± {wall[1]:.0f}", f"{speed[0]:.0f}", str(row["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"


def write_csvs(out: Path, results: dict[str, dict[int, dict]], labels: dict[str, str]) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "loss", "seed", *METRICS, "wall_s", "samples_per_s"])
        for label, by_seed in results.items():
            for seed, r in sorted(by_seed.items()):
                metrics = [r["final"].get(k, "") for k in METRICS]
                w.writerow([label, labels[label], seed, *metrics, f"{r['wall_s']:.1f}", f"{r['samples_per_s']:.1f}"])
    with (out / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "seed", "samples_seen", "top1"])
        for label, by_seed in results.items():
            for seed, r in sorted(by_seed.items()):
                w.writerows([label, seed, samples, top1] for samples, top1 in r["curve"])


def plot(out: Path, results: dict[str, dict[int, dict]], title: str) -> None:
    """Mean zero-shot top-1 over seeds vs samples seen, one line per label, ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_seed in results.items():
        curves = [dict(r["curve"]) for r in by_seed.values()]
        xs = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [mean_std([c[x] for c in curves]) for x in xs]
        mean = [m for m, _ in stats]
        ax.plot(xs, mean, label=label, marker=".")
        ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.15)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("zero-shot top-1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "top1.png", dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (run dirs, tables, plot)")
    p.add_argument("--runs-dir", type=Path, help="where the run dirs go (default: OUT/runs)")
    p.add_argument("--losses", default=",".join(ALL_LOSSES), help="comma list of LOSS or LABEL=LOSS (default: all)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of train.seed values (default 0,1,2)")
    p.add_argument("--global-batch", type=int, default=32, help="train.global_batch_size (default 32)")
    p.add_argument("--epochs", type=int, help="train.epochs (default: the run config's)")
    p.add_argument("--eval-every", type=int, help="eval.every_steps (default: one epoch of steps)")
    p.add_argument("--config", help="run config JSON shared by every run (default: the digits demo)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", help="DeepSpeed JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="shared override, repeatable")
    p.add_argument("--loss-set", action="append", default=[], metavar="LABEL:loss.KEY=VALUE", help="per-label")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes / GPUs) per run (default 2)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed (default 3600)")
    p.add_argument("--title", default="", help="plot title (default: derived from the setup)")
    p.add_argument("--summarize-only", action="store_true", help="only rebuild the tables and plot from --out")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        labels = parse_labels(args.losses)
        loss_sets = parse_loss_sets(args.loss_set, labels)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as err:
        parser.error(str(err))
    shared = [f"train.global_batch_size={args.global_batch}", *args.set]
    if args.epochs is not None:
        shared.append(f"train.epochs={args.epochs}")
    try:
        cfg = load_config(args.config, shared)
        validate(cfg, args.nproc)
    except ConfigError as err:
        parser.error(f"config: {err}")
    eval_every = args.eval_every or max(1, cfg["data"]["num_samples"] // args.global_batch)
    shared.append(f"eval.every_steps={eval_every}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict]] = {label: {} for label in labels}
    for label, loss in labels.items():
        for seed in seeds:
            run_dir = (args.runs_dir or args.out / "runs") / f"{label}_s{seed}"
            if not args.summarize_only and not (run_dir / "eval.json").is_file():
                train_args = ["--set", f"train.output_dir={run_dir}", "--set", f"train.seed={seed}"]
                train_args += ["--set", f"loss.name={loss}"]
                for override in [*shared, *loss_sets[label]]:
                    train_args += ["--set", override]
                if args.config:
                    train_args += ["--config", args.config]
                if args.deepspeed_config:
                    train_args += ["--deepspeed_config", args.deepspeed_config]
                info = run_one(launch_command(args.launcher, args.nproc, train_args), run_dir, args.timeout)
                status = "ok" if info["returncode"] == 0 else f"FAILED rc={info['returncode']}"
                print(f"{label} seed {seed}: {status} in {info['wall_s']:.0f} s ({run_dir})", flush=True)
            if (run_dir / "eval.json").is_file():
                results[label][seed] = read_run(run_dir)
    results = {label: runs for label, runs in results.items() if runs}
    if not results:
        print("no finished runs", file=sys.stderr)
        return 1
    _, table = summarize(results)
    write_csvs(args.out, results, labels)
    title = args.title or f"{args.nproc} ranks, global batch {args.global_batch}, seeds {args.seeds}"
    plot(args.out, results, title)
    (args.out / "summary.md").write_text(f"{title}\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
