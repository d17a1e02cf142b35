"""Run metrics on rank 0: tensorboard scalars and a JSON-lines file (``metrics.jsonl``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Writes ``{"step": ..., "kind": ..., **values}`` lines and ``<kind>/<name>`` tensorboard scalars."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # here: about 1 s to import, and only rank 0 writes

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = (run_dir / "metrics.jsonl").open("a")

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(f"{kind}/{name}", value, step)
        self.jsonl.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
