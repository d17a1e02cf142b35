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
them), ``results.csv`` (one row per run), ``curves.csv`` (top-1 per eval step), ``summary.md`` (mean ± std over
seeds; with a ``--reference`` label, the samples each label needs to reach the reference's final top-1), ``top1.png``.

``--combine DIR...`` joins finished sweeps at different global batches (from their CSVs alone) into one table
(per batch and label: top-1, its difference from the reference in units of the seed spread, ahead / level /
behind, samples to reach the reference's final top-1) and one plot, ``top1_by_batch.png``::

    python launchers/experiments.py --combine docs/results/sample_efficiency/b* --out docs/results/sample_efficiency
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
from typing import Any

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
    """Final metrics, eval curve (samples seen, top-1), wall time, median train samples/s and global batch of one
    run dir."""
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
        "global_batch": batch,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curve(by_seed: dict[int, dict]) -> list[tuple[int, float, float]]:
    """(samples seen, mean top-1, std) over seeds, at the eval points every seed has."""
    curves = [dict(r["curve"]) for r in by_seed.values()]
    xs = sorted(set.intersection(*(set(c) for c in curves)))
    return [(x, *mean_std([c[x] for c in curves])) for x in xs]


def samples_to_reach(curve: list[tuple[int, float]], target: float) -> float:
    """Samples seen when ``curve`` ((samples, top-1) pairs) first reaches ``target``, linearly interpolated between
    the eval points around the crossing (the first point itself if it is already there); ``inf`` if never."""
    previous = None
    for x, y in curve:
        if y >= target:
            if previous is None or previous[1] == y:
                return float(x)
            (x0, y0) = previous
            return x0 + (target - y0) / (y - y0) * (x - x0)
        previous = (x, y)
    return math.inf


def reach_row(by_seed: dict[int, dict], target: float, reference_samples: float) -> dict:
    """Samples the seed-mean curve needs to reach ``target``, how many times fewer than ``reference_samples``, and
    how many single seeds reach it."""
    samples = samples_to_reach([(x, m) for x, m, _ in mean_curve(by_seed)], target)
    seeds = sum(samples_to_reach(r["curve"], target) < math.inf for r in by_seed.values())
    return {"samples": samples, "fewer": reference_samples / samples, "seeds_reaching": seeds}


def reach_cells(reach: dict, seeds: int) -> list[str]:
    """Markdown cells of a :func:`reach_row`: samples (``never`` if the mean curve stays below), × fewer, seeds."""
    if reach["samples"] == math.inf:
        return ["never", "–", f"{reach['seeds_reaching']}/{seeds}"]
    return [f"{reach['samples']:,.0f}", f"{reach['fewer']:.2f}×", f"{reach['seeds_reaching']}/{seeds}"]


def reference_reach(results: dict[str, dict[int, dict]], reference: str) -> tuple[float, float]:
    """The reference label's mean final top-1 and the samples its own mean curve needs to reach it."""
    target = statistics.fmean(r["final"]["top1"] for r in results[reference].values())
    return target, samples_to_reach([(x, m) for x, m, _ in mean_curve(results[reference])], target)


def summarize(results: dict[str, dict[int, dict]], reference: str | None = None) -> tuple[list[dict], str]:
    """Per-label mean ± std over seeds: rows (for tests and CSV) and a markdown table. With a ``reference`` label,
    each row also gets :func:`reach_row` against the reference's mean final top-1."""
    if reference is not None:
        target, reference_samples = reference_reach(results, reference)
    rows = []
    for label, by_seed in results.items():
        runs = list(by_seed.values())
        row = {"label": label, "seeds": len(runs)}
        for key in METRICS:
            if all(key in r["final"] for r in runs):
                row[key] = mean_std([r["final"][key] for r in runs])
        row["wall_s"] = mean_std([r["wall_s"] for r in runs])
        row["samples_per_s"] = mean_std([r["samples_per_s"] for r in runs])
        if reference is not None:
            row["reach"] = reach_row(by_seed, target, reference_samples)
        rows.append(row)
    keys = [k for k in METRICS if all(k in row for row in rows)]
    header = ["loss", *keys, "wall s", "train samples/s", "seeds"]
    if reference is not None:
        header += [f"samples to {reference}'s top-1 {target:.4f}", f"fewer than {reference}", "seeds reaching"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], *(f"{row[k][0]:.4f} ± {row[k][1]:.4f}" for k in keys)]
        wall, speed = row["wall_s"], row["samples_per_s"]
        cells += [f"{wall[0]:.0f} ± {wall[1]:.0f}", f"{speed[0]:.0f}", str(row["seeds"])]
        if reference is not None:
            cells += reach_cells(row["reach"], row["seeds"])
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines) + "\n"


def compare_batches(sweeps: dict[int, dict[str, dict[int, dict]]], reference: str) -> tuple[list[dict], str]:
    """One row per (global batch, label): top-1 mean ± std, its difference from the reference's in units of the
    pooled seed spread sqrt((s_ref² + s²) / 2), a verdict (ahead / behind beyond one spread, else level) and
    :func:`reach_row`. Rows and a markdown table."""
    header = ["global batch", "loss", "top1", f"Δ vs {reference}", "Δ / seed spread", "verdict",
              f"samples to {reference}'s top-1", f"fewer than {reference}", "seeds reaching"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for batch, results in sorted(sweeps.items()):
        target, reference_samples = reference_reach(results, reference)
        ref_std = mean_std([r["final"]["top1"] for r in results[reference].values()])[1]
        for label, by_seed in results.items():
            mean, std = mean_std([r["final"]["top1"] for r in by_seed.values()])
            spread = math.sqrt((ref_std**2 + std**2) / 2)
            delta = mean - target
            in_spreads = delta / spread if spread > 0 else math.copysign(math.inf, delta) if delta else 0.0
            verdict = "ahead" if in_spreads > 1 else "behind" if in_spreads < -1 else "level"
            reach = reach_row(by_seed, target, reference_samples)
            rows.append({"global_batch": batch, "label": label, "top1": (mean, std), "delta": delta,
                         "delta_in_spreads": in_spreads, "verdict": verdict, "reach": reach})  # fmt: skip
            cells = [str(batch), label, f"{mean:.4f} ± {std:.4f}", f"{delta:+.4f}", f"{in_spreads:+.2f}", verdict]
            lines.append("| " + " | ".join(cells + reach_cells(reach, len(by_seed))) + " |")
    return rows, "\n".join(lines) + "\n"


def load_sweep(out: Path) -> dict[str, dict[int, dict]]:
    """A finished sweep's runs, rebuilt from its ``results.csv`` and ``curves.csv`` (the run dirs are not needed)."""
    results: dict[str, dict[int, dict]] = {}
    with (out / "results.csv").open() as f:
        for row in csv.DictReader(f):
            final = {k: float(row[k]) for k in METRICS if row[k]}
            run = {"final": final, "curve": [], "global_batch": int(row["global_batch"])}
            results.setdefault(row["label"], {})[int(row["seed"])] = run
    with (out / "curves.csv").open() as f:
        for row in csv.DictReader(f):
            results[row["label"]][int(row["seed"])]["curve"].append((int(row["samples_seen"]), float(row["top1"])))
    return results


def write_csvs(out: Path, results: dict[str, dict[int, dict]], labels: dict[str, str]) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "loss", "seed", "global_batch", *METRICS, "wall_s", "samples_per_s"])
        for label, by_seed in results.items():
            for seed, r in sorted(by_seed.items()):
                metrics = [r["final"].get(k, "") for k in METRICS]
                speed = [f"{r['wall_s']:.1f}", f"{r['samples_per_s']:.1f}"]
                w.writerow([label, labels[label], seed, r["global_batch"], *metrics, *speed])
    with (out / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "seed", "samples_seen", "top1"])
        for label, by_seed in results.items():
            for seed, r in sorted(by_seed.items()):
                w.writerows([label, seed, samples, top1] for samples, top1 in r["curve"])


def plot_curves(ax: Any, results: dict[str, dict[int, dict]], title: str) -> None:
    """Mean zero-shot top-1 over seeds vs samples seen on ``ax``, one line per label, ±1 std band."""
    for label, by_seed in results.items():
        curve = mean_curve(by_seed)
        xs, means = [x for x, _, _ in curve], [m for _, m, _ in curve]
        ax.plot(xs, means, label=label, marker=".")
        ax.fill_between(xs, [m - s for _, m, s in curve], [m + s for _, m, s in curve], alpha=0.15)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("zero-shot top-1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(out: Path, results: dict[str, dict[int, dict]], title: str) -> None:
    """``top1.png``: :func:`plot_curves` of one sweep."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_curves(ax, results, title)
    fig.tight_layout()
    fig.savefig(out / "top1.png", dpi=120)
    plt.close(fig)


def plot_batches(out: Path, sweeps: dict[int, dict[str, dict[int, dict]]], title: str) -> None:
    """``top1_by_batch.png``: one :func:`plot_curves` panel per global batch and a last panel of final top-1
    (mean ± std over seeds) against the global batch."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(sweeps) + 1, figsize=(4.2 * (len(sweeps) + 1), 4), squeeze=False)
    for ax, (batch, results) in zip(axes[0], sorted(sweeps.items()), strict=False):
        plot_curves(ax, results, f"global batch {batch}")
    ax = axes[0][-1]
    labels = list(dict.fromkeys(label for results in sweeps.values() for label in results))
    for label in labels:
        points = [(b, mean_std([r["final"]["top1"] for r in res[label].values()])) for b, res in sorted(sweeps.items())
                  if label in res]  # fmt: skip
        ax.errorbar([b for b, _ in points], [m for _, (m, _) in points], [s for _, (_, s) in points],
                    label=label, marker="o", capsize=3)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch")
    ax.set_ylabel("final zero-shot top-1")
    ax.set_title("final top-1 (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "top1_by_batch.png", dpi=110)
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
    p.add_argument("--reference", help="label whose final top-1 the others must reach (default: openclip if listed)")
    p.add_argument("--combine", nargs="+", type=Path, metavar="DIR",
                   help="join finished sweeps (their --out dirs, one per global batch) into one table and plot "
                        "in --out; runs nothing")  # fmt: skip
    return p


def combine(out: Path, dirs: list[Path], reference: str, title: str) -> int:
    """``--combine``: :func:`compare_batches` of the sweeps in ``dirs`` -> ``summary.md``, ``summary.csv``,
    ``top1_by_batch.png`` in ``out``."""
    sweeps: dict[int, dict[str, dict[int, dict]]] = {}
    for d in dirs:
        results = load_sweep(d)
        batch = {r["global_batch"] for runs in results.values() for r in runs.values()}
        if len(batch) != 1 or batch <= sweeps.keys() or reference not in results:
            raise ValueError(f"--combine {d}: needs one global batch not seen before and the {reference!r} label")
        sweeps[batch.pop()] = results
    rows, table = compare_batches(sweeps, reference)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["global_batch", "label", "top1_mean", "top1_std", "delta", "delta_in_spreads", "verdict",
                    "samples_to_reach", "fewer", "seeds_reaching"])  # fmt: skip
        for r in rows:
            reach = r["reach"]
            w.writerow([r["global_batch"], r["label"], *r["top1"], r["delta"], r["delta_in_spreads"], r["verdict"],
                        reach["samples"], reach["fewer"], reach["seeds_reaching"]])  # fmt: skip
    plot_batches(out, sweeps, title or f"final top-1 vs global batch (reference {reference})")
    (out / "summary.md").write_text(f"{title}\n\n{table}")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        labels = parse_labels(args.losses)
        loss_sets = parse_loss_sets(args.loss_set, labels)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as err:
        parser.error(str(err))
    reference = args.reference or ("openclip" if "openclip" in labels else None)
    if args.combine:
        try:
            return combine(args.out, args.combine, reference or "openclip", args.title)
        except (OSError, KeyError, ValueError) as err:
            parser.error(str(err))
    if reference is not None and reference not in labels:
        parser.error(f"--reference {reference!r} is not one of the labels {', '.join(labels)}")
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
    _, table = summarize(results, reference if reference in results else None)
    write_csvs(args.out, results, labels)
    title = args.title or f"{args.nproc} ranks, global batch {args.global_batch}, seeds {args.seeds}"
    plot(args.out, results, title)
    (args.out / "summary.md").write_text(f"{title}\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
