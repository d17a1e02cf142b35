"""Run metrics on rank 0: tensorboard scalars, a JSON-lines file (``metrics.jsonl``) and optionally a wandb run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Writes ``{"step": ..., "kind": ..., **values}`` lines and ``<kind>/<name>`` tensorboard (and wandb) scalars."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_run: Any = None) -> None:
        self.enabled, self.wandb_run = enabled, wandb_run
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # here: about 1 s to import, and only rank 0 writes

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = (run_dir / "metrics.jsonl").open("a")

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {f"{kind}/{name}": value for name, value in values.items() if isinstance(value, int | float)}
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        self.jsonl.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
