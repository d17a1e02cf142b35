"""The experiment runner (``launchers/experiments.py``): argument parsing, summaries against hand-computed
values, outputs of a real 2-loss sweep, the head-to-head log parsing, and the paper recipes (``recipes/``)."""

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from fastclip_ds.config import load_config, validate

LAUNCHERS = Path(__file__).resolve().parents[1] / "launchers"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(LAUNCHERS))
import experiments  # noqa: E402
import head_to_head  # noqa: E402


def test_parse_labels_and_loss_sets():
    labels = experiments.parse_labels("openclip, v3a=fastclip_v3,fastclip_v3")
    assert labels == {"openclip": "openclip", "v3a": "fastclip_v3", "fastclip_v3": "fastclip_v3"}
    sets = experiments.parse_loss_sets(["v3a:loss.rho=6.5", "v3a:loss.gamma=0.2"], labels)
    assert sets == {"openclip": [], "v3a": ["loss.rho=6.5", "loss.gamma=0.2"], "fastclip_v3": []}
    for bad in ("clip", "openclip,openclip", ""):
        with pytest.raises(ValueError):
            experiments.parse_labels(bad)
    for bad in ("v3b:loss.rho=1", "v3a:train.lr=1", "v3a:loss.name=openclip", "loss.rho=1"):
        with pytest.raises(ValueError):
            experiments.parse_loss_sets([bad], labels)


def test_launch_commands():
    cmd = experiments.launch_command("torchrun", 2, ["--set", "a.b=1"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node"] and cmd[-4:] == [
        "-m", "fastclip_ds.train", "--set", "a.b=1"]  # fmt: skip
    cmd = experiments.launch_command("deepspeed", 8, [])
    assert cmd[:3] == ["deepspeed", "--num_gpus", "8"] and cmd[-2:] == ["--module", "fastclip_ds.train"]
    with pytest.raises(ValueError):
        experiments.launch_command("mpirun", 2, [])


def fake_run(run_dir: Path, batch: int, evals: list[tuple[int, float]], speeds: list[float], wall: float) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"train": {"global_batch_size": batch}}))
    lines = [{"step": 10 * (i + 1), "kind": "train", "samples_per_s": s} for i, s in enumerate(speeds)]
    lines += [{"step": step, "kind": "eval", "top1": top1, "top5": 1.0} for step, top1 in evals]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "eval.json").write_text(json.dumps({"top1": evals[-1][1], "top5": 1.0}))
    (run_dir / "runner.json").write_text(json.dumps({"wall_s": wall, "returncode": 0}))
    return run_dir


def test_read_run_and_summary_hand_computed(tmp_path):
    a = experiments.read_run(fake_run(tmp_path / "a", 32, [(5, 0.2), (10, 0.5), (10, 0.5)], [100, 300, 200], 60))
    assert a["curve"] == [(160, 0.2), (320, 0.5)]  # the repeated final eval counts once; samples = step * batch
    assert a["samples_per_s"] == 200 and a["wall_s"] == 60 and a["final"]["top1"] == 0.5
    b = experiments.read_run(fake_run(tmp_path / "b", 32, [(5, 0.4), (10, 0.7)], [100], 80))
    rows, table = experiments.summarize({"v3": {0: a, 1: b}})
    mean, std = rows[0]["top1"]
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1414213562373095)  # stdev(0.5, 0.7)
    assert rows[0]["wall_s"] == (70, pytest.approx(14.142135623730951)) and rows[0]["seeds"] == 2
    assert "| v3 | 0.6000 ± 0.1414 | 1.0000 ± 0.0000 | 70 ± 14 | 150 | 2 |" in table
    experiments.write_csvs(tmp_path, {"v3": {0: a, 1: b}}, {"v3": "fastclip_v3"})
    assert experiments.load_sweep(tmp_path)["v3"][1]["curve"] == [(160, 0.4), (320, 0.7)]
    with (tmp_path / "curves.csv").open() as f:
        assert list(csv.reader(f))[1:] == [["v3", "0", "160", "0.2"], ["v3", "0", "320", "0.5"],
                                          ["v3", "1", "160", "0.4"], ["v3", "1", "320", "0.7"]]  # fmt: skip
    experiments.plot(tmp_path, {"v3": {0: a, 1: b}}, "t")
    assert (tmp_path / "top1.png").read_bytes()[:4] == b"\x89PNG"


def test_samples_to_reach_hand_computed():
    curve = [(100, 0.2), (200, 0.5), (300, 0.8)]
    assert experiments.samples_to_reach(curve, 0.65) == pytest.approx(250)  # interpolated, not the next point (300)
    assert experiments.samples_to_reach(curve, 0.5) == 200 and experiments.samples_to_reach(curve, 0.1) == 100
    assert experiments.samples_to_reach(curve, 0.81) == float("inf")
    assert experiments.samples_to_reach([(100, 0.6), (200, 0.4), (300, 0.7)], 0.5) == 100  # the first crossing


def sweep(finals: dict[str, list[list[float]]], batch: int) -> dict[str, dict[int, dict]]:
    """Fake runs: per label, per seed, top-1 at evals every 100 samples (the last one is the final)."""
    return {
        label: {seed: {"final": {"top1": c[-1], "top5": 1.0}, "curve": [(100 * (i + 1), y) for i, y in enumerate(c)],
                       "wall_s": 1.0, "samples_per_s": 1.0, "global_batch": batch} for seed, c in enumerate(curves)}
        for label, curves in finals.items()
    }  # fmt: skip


def test_summary_samples_to_reach_the_reference():
    # openclip's mean final 0.6 is reached by its own mean curve (0.3, 0.45, 0.6) at 300 samples; v3's mean
    # curve (0.4, 0.7, 0.8) crosses 0.6 at 100 + 0.2/0.3*100 samples, so 300 / 166.7 = 1.8x fewer; seed 1 of v1
    # (0.5, 0.55, 0.58) never reaches 0.6, seed 0 (0.5, 0.6, 0.7) does.
    results = sweep({"openclip": [[0.2, 0.4, 0.5], [0.4, 0.5, 0.7]], "v3": [[0.4, 0.7, 0.8], [0.4, 0.7, 0.8]],
                     "v1": [[0.5, 0.6, 0.7], [0.5, 0.55, 0.58]]}, 32)  # fmt: skip
    rows, table = experiments.summarize(results, "openclip")
    reach = {r["label"]: r["reach"] for r in rows}
    assert reach["openclip"] == {"samples": 300, "fewer": 1.0, "seeds_reaching": 1}  # its seed 0 ends at 0.5
    assert reach["v3"]["samples"] == pytest.approx(500 / 3) and reach["v3"]["fewer"] == pytest.approx(1.8)
    assert reach["v1"]["samples"] == pytest.approx(200 + 0.025 / 0.065 * 100)  # mean curve (0.5, 0.575, 0.64)
    assert reach["v1"]["seeds_reaching"] == 1
    assert "samples to openclip's top-1 0.6000" in table and "| 167 | 1.80× | 2/2 |" in table
    _, table = experiments.summarize(sweep({"openclip": [[0.5, 0.9]], "v3": [[0.1, 0.2]]}, 32), "openclip")
    assert "| never | – | 0/1 |" in table


def test_combine_batches_from_csvs(tmp_path):
    # Sample stds: stdev(0.68, 0.72) = 0.02·√2. Batch 32: v3 0.8 vs openclip 0.7, both ± 0.02·√2 -> +0.1 / (0.02·√2)
    # = +3.54 spreads, ahead. Batch 64: 0.71 ± 0 -> pooled sqrt((0.0008 + 0) / 2) = 0.02, +0.01 / 0.02 = +0.5, level.
    # Written and read back through the CSVs.
    dirs = []
    for batch, v3 in ((32, [[0.5, 0.78], [0.5, 0.82]]), (64, [[0.3, 0.71], [0.3, 0.71]])):
        results = sweep({"openclip": [[0.4, 0.68], [0.4, 0.72]], "v3": v3}, batch)
        dirs.append(tmp_path / f"b{batch}")
        dirs[-1].mkdir()
        experiments.write_csvs(dirs[-1], results, {"openclip": "openclip", "v3": "fastclip_v3"})
    assert experiments.main(["--combine", *map(str, dirs), "--out", str(tmp_path / "all"), "--title", "t"]) == 0
    with (tmp_path / "all" / "summary.csv").open() as f:
        rows = {(r["global_batch"], r["label"]): r for r in csv.DictReader(f)}
    assert rows["32", "v3"]["verdict"] == "ahead" and rows["64", "v3"]["verdict"] == "level"
    assert float(rows["32", "v3"]["delta_in_spreads"]) == pytest.approx(5 / 2**0.5)
    assert float(rows["64", "v3"]["delta_in_spreads"]) == pytest.approx(0.5)
    assert rows["32", "openclip"]["verdict"] == "level" and float(rows["32", "openclip"]["delta"]) == 0
    assert (tmp_path / "all" / "top1_by_batch.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):  # the same batch twice is refused
        experiments.main(["--combine", str(dirs[0]), str(dirs[0]), "--out", str(tmp_path / "x")])


def test_open_clip_log_throughput(tmp_path):
    log = tmp_path / "out.log"
    log.write_text(
        "2026-11-27,05:00:00 | INFO | Train Epoch: 0 [  32/1408 (2%)] Data (t): 0.1 ...\n"
        "2026-11-27,05:00:01 | INFO | Start epoch 1\n"
        "2026-11-27,05:00:10 | INFO | Train Epoch: 1 [ 352/1408 (25%)] Data (t): 0.1 ...\n"
    )
    assert head_to_head.open_clip_throughput(log) == pytest.approx((1408 + 352 - 32) / 10)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.json")), ids=lambda p: p.stem)
def test_recipes_load_and_validate(recipe):
    cfg = load_config(recipe)
    world, per_rank = (int(x) for x in recipe.stem.rsplit("_", 1)[1].split("x"))  # name ends in GPUSxBATCH
    validate(cfg, world)
    assert cfg["train"]["global_batch_size"] == world * per_rank
    assert cfg["data"]["dataset_size"] >= cfg["data"]["num_samples"]
    assert cfg["loss"]["name"] == "fastclip_v3" and cfg["loss"]["tau_scheduler"] == "step_thresh"


@pytest.mark.slow  # about 30 s: two 1-rank training runs (ranks do not change what the runner does)
def test_sweep_end_to_end(tmp_path, digits_root):
    from fastclip_ds import digits

    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--losses", "openclip,v3=fastclip_v3", "--seeds", "0", "--nproc", "1",
            "--global-batch", "32", "--eval-every", "4", "--timeout", "300", "--loss-set", "v3:loss.rho=6.5",
            "--set", "model.config=fastclip-micro", "--set", f"data.train={digits.train_pattern(digits_root)}",
            "--set", f"eval.data={digits_root / 'eval'}", "--set", "train.max_steps=8",
            "--set", "train.warmup_steps=2"]  # fmt: skip
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assert experiments.main(argv) == 0
    for label in ("openclip", "v3"):
        cfg = json.loads((out / "runs" / f"{label}_s0" / "config.json").read_text())
        assert cfg["train"]["global_batch_size"] == 32 and cfg["train"]["max_steps"] == 8
        assert cfg["loss"]["rho"] == (6.5 if label == "v3" else 8.0)
    with (out / "curves.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["label"], r["samples_seen"]) for r in rows] == [("openclip", "128"), ("openclip", "256"),
                                                               ("v3", "128"), ("v3", "256")]  # fmt: skip
    assert (out / "top1.png").is_file() and "| v3 |" in (out / "summary.md").read_text()


def test_head_to_head_summary_and_table():
    def row(seed, ours, theirs, ratio):
        return {"seed": seed, "ours": {"top1": ours}, "open_clip": {"top1": theirs}, "speed_ratio": ratio,
                "ours_samples_per_s": 90.0 * ratio, "open_clip_samples_per_s": 90.0, "ours_wall_s": 60,
                "open_clip_wall_s": 60}  # fmt: skip

    rows = [row(0, 0.7, 0.6, 0.9), row(1, 0.8, 0.8, 1.0), row(2, 0.6, 0.8, 1.1)]
    s = head_to_head.summarize(rows)
    half = 4.302652729749464 * 0.15275252316519466 / 3**0.5  # t(0.975, 2 dof) * stdev(0.1, 0, -0.2) / sqrt(3)
    assert s["diff_top1"] == pytest.approx(-0.1 / 3) and s["diff_top1_std"] == pytest.approx(0.15275252316519466)
    assert s["diff_ci95"] == pytest.approx([-0.1 / 3 - half, -0.1 / 3 + half])
    assert (s["ours_ahead"], s["seeds"], s["speed_ratio_min"]) == (1, 3, 0.9)
    assert s["speed_ratio"] == pytest.approx(1.0) and s["ours_top1"] == pytest.approx(0.7)
    text = head_to_head.table(rows)
    assert "| mean ± std | 90.0 | 90.0 | 1.00 | 0.7000 ± 0.1000 | 0.7333 ± 0.1155 | | |" in text
    assert "-0.0333 ± 0.1528 (std), 95 % t interval [-0.4128, +0.3461]; ours ahead in 1 of 3" in text
    assert head_to_head.summarize(rows[:1]) == {"seeds": 1, "ours_top1": 0.7, "open_clip_top1": 0.6,
                                                 "diff_top1": pytest.approx(0.1), "speed_ratio": 0.9,
                                                 "speed_ratio_min": 0.9}  # fmt: skip


@pytest.mark.slow  # about 60 s: our trainer and open_clip_train, one short run each, then both scored
def test_head_to_head_end_to_end(tmp_path, digits_root, monkeypatch):
    from fastclip_ds import digits

    out = tmp_path / "h2h"
    argv = ["--out", str(out), "--train", digits.train_pattern(digits_root), "--eval-data",
            str(digits.eval_root(digits_root)), "--model", "fastclip-micro", "--epochs", "8", "--warmup", "20",
            "--lr", "2e-3", "--seeds", "0", "--timeout", "300"]  # fmt: skip
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert head_to_head.main(argv) == 0
    report = json.loads((out / "head_to_head.json").read_text())
    (row,) = report["rows"]
    assert row["ours_samples_per_s"] > 0 and row["open_clip_samples_per_s"] > 0
    for side in ("ours", "open_clip"):
        assert 0.2 < row[side]["top1"] <= 1 and row[side]["n"] == 397  # both learn in 344 steps (chance: 0.1)
    args = (out / "runs" / "open_clip_train_s0" / "args.txt").read_text().split()
    assert args[args.index("--grad-clip-norm") + 1] == "1.0"  # from ds_configs/cpu_zero0_fp32.json
    assert "| 0 |" in (out / "head_to_head.md").read_text()
