"""``fastclip-ds``: one command for training, data, export, evaluation and kernel benchmarks."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("fastclip_ds.train", "train a CLIP model with DeepSpeed (also: python -m fastclip_ds.train)"),
    "data": ("fastclip_ds.digits", "write datasets: 'data digits OUT_DIR' writes the scikit-learn digits shards"),
    "export": ("fastclip_ds.export", "RUN_DIR --out model.pt: write an open_clip checkpoint + model-config JSON"),
    "eval": ("fastclip_ds.eval.zeroshot", "zero-shot classification or retrieval of an open_clip checkpoint"),
    "bench": ("fastclip_kernels.bench", "micro-benchmark of the loss kernels against open_clip's ClipLoss"),
    "comm-bench": ("fastclip_ds.comm_bench", "bytes per step of each collective: openclip vs fastclip losses"),
    "bench-memory": ("fastclip_ds.memory_bench", "peak memory and samples/s of a step vs micro-batch, checkpointing"),
    "bench-data": ("fastclip_ds.data_bench", "train loader vs open_clip_train's webdataset pipeline; IO amplification"),
}

USAGE = (
    "usage: fastclip-ds COMMAND [ARGS...]   (fastclip-ds COMMAND --help for its options)\n\ncommands:\n"
    + "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items())
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastclip-ds: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if name == "data":  # `fastclip-ds data digits OUT_DIR`: the dataset name is the writer's first argument
        rest = rest[1:] if rest[:1] == ["digits"] else rest
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
