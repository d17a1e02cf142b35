"""Head-to-head: our trainer (``loss.name=openclip``) vs OpenCLIP's own ``open_clip_train`` on the same setup.

Both run under torchrun with the same shards, model config, global batch, epochs (samples), optimizer
(AdamW, lr, betas, eps, weight decay), warm-up + cosine schedule, gradient clipping (read from our DeepSpeed
config), fp32 precision, seed (hence the same initial weights) and number of ranks. Ours runs with
``--ds-config``, by default ZeRO-0: like open_clip_train's DDP, every rank keeps the whole optimizer state.
``launchers/update_parity.py`` checks that, from the same weights on the same batches, the two trainers take
the same steps.
Both exports are scored by our zero-shot eval (``fastclip_ds.eval``). Throughput is the steady-state train
rate: samples between the first and the last train log line over the time between them (startup, final
checkpoint and eval excluded; each trainer's own logs). Default: the digits demo on 2 CPU ranks::

    python launchers/head_to_head.py --out docs/results/head_to_head --seeds 0,1

Writes ``OUT/head_to_head.md`` (table) and ``OUT/head_to_head.json`` (every number); run dirs under ``--runs-dir``.
Differences that remain: the augmentation draws and the data order (open_clip_train splits the shards over
ranks, each rank shuffling its own; ours walks one seeded global stream, ``--data-split rank`` switches ours to
the OpenCLIP-style split), and the zero-shot eval ours runs at the end of training (outside the timed window).
Without ``--oc-resampled`` each rank must get the same number of full batches per epoch (digits: 14 shards of
100 over 2 ranks), or open_clip_train's ranks fall out of step; ``--oc-resampled`` passes ``--dataset-resampled``
(shards drawn with replacement per rank, OpenCLIP's usual large-scale setting).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from fastclip_ds.multiproc import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d) \| INFO \| Train Epoch: (\d+) \[\s*(\d+)/(\d+)")


def torchrun(nproc: int, target: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *target]  # fmt: skip


def run(cmd: list[str], log: Path, timeout: float) -> float:
    """Run ``cmd`` with output to ``log``; the wall time in seconds. Raises on a non-zero exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} ... exited with {rc}; see {log}")
    return time.perf_counter() - start


def ours_throughput(run_dir: Path) -> float:
    """Samples/s between the first and last train record of our ``metrics.jsonl``."""
    batch = json.loads((run_dir / "config.json").read_text())["train"]["global_batch_size"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    train = [json.loads(x) for x in lines if '"kind": "train"' in x]
    if len(train) < 2:
        raise ValueError(f"{run_dir}: fewer than two train records in metrics.jsonl")
    return (train[-1]["step"] - train[0]["step"]) * batch / (train[-1]["time"] - train[0]["time"])


def open_clip_throughput(log: Path) -> float:
    """Samples/s between the first and last ``Train Epoch`` line of open_clip_train's log (1 s timestamps).

    A line reads ``Train Epoch: E [ n/N ...]``: n samples of the epoch's N (N rounded up to whole global batches).
    """
    points = []
    for line in log.read_text().splitlines():
        m = LOG_LINE.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d,%H:%M:%S").timestamp()
            points.append((t, int(m.group(2)) * int(m.group(4)) + int(m.group(3))))
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        raise ValueError(f"{log}: not enough 'Train Epoch' lines to time")
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def score(checkpoint: Path, model: str, data: Path) -> dict[str, float]:
    from fastclip_ds.eval import evaluate
    from fastclip_ds.eval.zeroshot import load_open_clip_checkpoint

    net, tokenizer, preprocess = load_open_clip_checkpoint(checkpoint, model=model)
    return evaluate(net, tokenizer, preprocess, data)


def summarize(rows: list[dict]) -> dict[str, float]:
    """Means over the seeds and the paired top-1 difference (ours - open_clip_train) with its 95 % t interval."""
    from scipy import stats

    ours = [r["ours"]["top1"] for r in rows]
    theirs = [r["open_clip"]["top1"] for r in rows]
    diff = [a - b for a, b in zip(ours, theirs, strict=True)]
    out = {
        "seeds": len(rows),
        "ours_top1": statistics.fmean(ours),
        "open_clip_top1": statistics.fmean(theirs),
        "diff_top1": statistics.fmean(diff),
        "speed_ratio": statistics.fmean(r["speed_ratio"] for r in rows),
        "speed_ratio_min": min(r["speed_ratio"] for r in rows),
    }
    if len(rows) > 1:
        half = stats.t.ppf(0.975, len(rows) - 1) * statistics.stdev(diff) / len(rows) ** 0.5
        out |= {
            "ours_top1_std": statistics.stdev(ours),
            "open_clip_top1_std": statistics.stdev(theirs),
            "diff_top1_std": statistics.stdev(diff),
            "diff_ci95": [out["diff_top1"] - half, out["diff_top1"] + half],
            "ours_ahead": sum(d > 0 for d in diff),
        }
    return out


def table(rows: list[dict]) -> str:
    """The markdown table: one line per seed, then the means and the paired difference."""
    lines = [
        "| seed | ours samples/s | open_clip_train samples/s | ratio | ours top-1 | open_clip_train top-1 "
        "| ours wall s | open_clip_train wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['ours_samples_per_s']:.1f} | {r['open_clip_samples_per_s']:.1f} | "
            f"{r['speed_ratio']:.2f} | {r['ours']['top1']:.4f} | {r['open_clip']['top1']:.4f} | "
            f"{r['ours_wall_s']:.0f} | {r['open_clip_wall_s']:.0f} |"
        )
    if len(rows) > 1:
        s = summarize(rows)
        lines.append(
            f"| mean ± std | {statistics.fmean(r['ours_samples_per_s'] for r in rows):.1f} | "
            f"{statistics.fmean(r['open_clip_samples_per_s'] for r in rows):.1f} | {s['speed_ratio']:.2f} | "
            f"{s['ours_top1']:.4f} ± {s['ours_top1_std']:.4f} | "
            f"{s['open_clip_top1']:.4f} ± {s['open_clip_top1_std']:.4f} | | |"
        )
        lo, hi = s["diff_ci95"]
        lines += [
            "",
            f"Paired top-1 difference (ours - open_clip_train) over {s['seeds']} seeds: {s['diff_top1']:+.4f} "
            f"± {s['diff_top1_std']:.4f} (std), 95 % t interval [{lo:+.4f}, {hi:+.4f}]; ours ahead in "
            f"{s['ours_ahead']} of {s['seeds']}. Speed ratio: mean {s['speed_ratio']:.2f}, lowest "
            f"{s['speed_ratio_min']:.2f}.",
        ]
    return "\n".join(lines) + "\n"


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    """``OUT/head_to_head.json`` (arguments, rows, summary) and ``OUT/head_to_head.md`` (the table)."""
    report = {"args": vars(args) | {"out": str(args.out)}, "rows": rows, "summary": summarize(rows)}
    (args.out / "head_to_head.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "head_to_head.md").write_text(table(rows))


def main(argv: list[str] | None = None) -> int:
    from fastclip_ds import digits

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the table and JSON")
    p.add_argument("--runs-dir", type=Path, help="run dirs (default OUT/runs)")
    p.add_argument("--train", default=digits.train_pattern(digits.DEFAULT_ROOT), help="train shards (brace pattern)")
    p.add_argument("--num-samples", type=int, default=digits.NUM_TRAIN, help="samples per epoch")
    p.add_argument("--eval-data", type=Path, default=digits.eval_root(digits.DEFAULT_ROOT), help="eval split")
    p.add_argument("--model", default="fastclip-tiny", help="registered model name (ours ship fastclip-*)")
    p.add_argument("--global-batch", type=int, default=32, help="global batch (split evenly over --nproc ranks)")
    p.add_argument("--epochs", type=int, default=5, help="epochs over --num-samples")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps before the cosine decay")
    p.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay (not on gains, biases, logit_scale)")
    p.add_argument("--seeds", default="0", help="comma list of seeds (each seed runs both trainers)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per trainer (torchrun --nproc_per_node)")
    p.add_argument("--data-split", choices=("global", "rank"), default="global", help="our data.split")
    p.add_argument("--ds-config", type=Path, default=REPO / "ds_configs" / "cpu_zero0_fp32.json",
                   help="our DeepSpeed config; its gradient_clipping is passed to open_clip_train as "
                   "--grad-clip-norm")  # fmt: skip
    p.add_argument("--oc-resampled", action="store_true", help="open_clip_train with --dataset-resampled")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of OUT/head_to_head.json (except the seeds rerun now) and add these seeds",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds each training run may take")
    args = p.parse_args(argv)
    if args.global_batch % args.nproc:
        p.error(f"--global-batch {args.global_batch} is not divisible by --nproc {args.nproc}")
    clip = json.loads(args.ds_config.read_text()).get("gradient_clipping", 0.0)
    runs = args.runs_dir or args.out / "runs"
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    previous = args.out / "head_to_head.json"
    rows = []
    if args.append and previous.is_file():
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["seed"] not in seeds]
    for seed in seeds:
        ours_dir, oc_logs, name = runs / f"ours_s{seed}", runs / f"open_clip_train_s{seed}", "run"
        for old in (ours_dir, oc_logs):  # a rerun of a seed replaces its runs (open_clip_train refuses an old one)
            shutil.rmtree(old, ignore_errors=True)
        sets = {
            "loss.name": "openclip", "model.config": args.model, "data.train": args.train,
            "data.num_samples": args.num_samples, "data.split": args.data_split, "train.global_batch_size":
            args.global_batch, "train.epochs": args.epochs, "train.lr": args.lr, "train.warmup_steps": args.warmup,
            "optimizer.weight_decay": args.wd, "train.seed": seed, "train.output_dir": str(ours_dir),
            "eval.data": str(args.eval_data), "eval.every_steps": 0, "train.log_every_steps": 10,
        }  # fmt: skip
        ours_cmd = [
            "-m",
            "fastclip_ds.train",
            "--deepspeed_config",
            str(args.ds_config),
            *(x for k, v in sets.items() for x in ("--set", f"{k}={v}")),
        ]
        ours_wall = run(torchrun(args.nproc, ours_cmd), ours_dir / "train.log", args.timeout)
        subprocess.run([sys.executable, "-m", "fastclip_ds.export", str(ours_dir), "--out", str(ours_dir / "model.pt")],
                       check=True, timeout=600, capture_output=True)  # fmt: skip

        oc_args = [
            "--train-data", args.train, "--train-num-samples", str(args.num_samples), "--dataset-type", "webdataset",
            *(["--dataset-resampled"] if args.oc_resampled else []),
            "--batch-size", str(args.global_batch // args.nproc),
            "--epochs", str(args.epochs),
            "--lr", str(args.lr), "--warmup", str(args.warmup), "--wd", str(args.wd), "--beta1", "0.9", "--beta2",
            "0.98", "--eps", "1e-6", "--precision", "fp32", "--workers", "1", "--model", args.model, "--device",
            "cpu", "--seed", str(seed), "--logs", str(oc_logs), "--name", name, "--save-frequency", str(args.epochs),
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "10", "--local-loss",
            "--gather-with-grad", *(["--grad-clip-norm", str(clip)] if clip else []),
        ]  # fmt: skip
        oc_logs.mkdir(parents=True, exist_ok=True)
        (oc_logs / "args.txt").write_text("\n".join(oc_args) + "\n")  # torchrun would misread --logs: see the wrapper
        oc_wall = run(torchrun(args.nproc, [str(HERE / "run_open_clip_train.py"), f"@{oc_logs / 'args.txt'}"]),
                      oc_logs / "stdout.log", args.timeout)  # fmt: skip
        oc_ckpt = oc_logs / name / "checkpoints" / f"epoch_{args.epochs}.pt"
        row = {
            "seed": seed,
            "ours_samples_per_s": ours_throughput(ours_dir),
            "open_clip_samples_per_s": open_clip_throughput(oc_logs / name / "out.log"),
            "ours_wall_s": ours_wall,
            "open_clip_wall_s": oc_wall,
            "ours": score(ours_dir / "model.pt", args.model, args.eval_data),
            "open_clip": score(oc_ckpt, args.model, args.eval_data),
        }
        row["speed_ratio"] = row["ours_samples_per_s"] / row["open_clip_samples_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(args, rows)  # after every seed: an interrupted sweep keeps what it measured
    print(table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
