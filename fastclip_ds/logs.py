"""The run's log file ``RUN_DIR/out.log`` and the optional wandb run.

``out.log`` gets rank 0's console lines (stdout and stderr; of a progress bar redrawn in place only its last state
before each newline) and the warnings of every rank (Python warnings and log records at WARNING or above, each line
prefixed ``rank R:``). Lines are appended: a resumed run continues the same file.
"""

from __future__ import annotations

import atexit
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

LOG_NAME = "out.log"
_LOGGERS = ("", "DeepSpeed")  # the root logger and DeepSpeed's own (which does not propagate)


class _Tee:
    """A text stream that writes through to ``stream`` and hands every finished line to ``sink``."""

    def __init__(self, stream: TextIO, sink: Callable[[str], None]) -> None:
        self.stream, self.sink, self.pending = stream, sink, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1]  # a bar redrawn with '\r': its last state
            if line.strip():
                self.sink(line)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self.stream, name)


class _WarningHandler(logging.Handler):
    """Log records at WARNING and above to ``out.log`` with the rank; ``echo``: also to the console (for a logger
    without handlers of its own, whose records Python's last-resort handler showed there)."""

    def __init__(self, run_log: RunLog, echo: bool) -> None:
        super().__init__(logging.WARNING)
        self.run_log, self.echo = run_log, echo
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.run_log.warning(self.format(record), echo=self.echo)


class RunLog:
    """``out.log`` of one process; :meth:`close` (also at exit) restores the streams, hooks and handlers."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.rank = rank
        self.file = (Path(run_dir) / LOG_NAME).open("a", buffering=1)
        self.console = sys.stderr  # the real stderr: warnings are shown there, as without this log
        self.streams = sys.stdout, sys.stderr
        self.showwarning = warnings.showwarning
        if rank == 0:
            sys.stdout, sys.stderr = _Tee(sys.stdout, self.write), _Tee(sys.stderr, self.write)
        warnings.showwarning = self._showwarning
        self.handlers = {name: _WarningHandler(self, echo=not logging.getLogger(name).handlers) for name in _LOGGERS}
        for name, handler in self.handlers.items():
            logging.getLogger(name).addHandler(handler)
        atexit.register(self.close)

    def write(self, line: str) -> None:
        if not self.file.closed:
            self.file.write(line + "\n")

    def warning(self, text: str, echo: bool = True) -> None:
        """A warning of this rank: on its console (``echo``), and in ``out.log`` prefixed with the rank."""
        if echo:
            self.console.write(text.rstrip("\n") + "\n")
        for line in text.rstrip("\n").splitlines():
            self.write(f"rank {self.rank}: {line}")

    def _showwarning(self, message: Any, category: type[Warning], filename: str, lineno: int, *_: Any) -> None:
        self.warning(warnings.formatwarning(message, category, filename, lineno))

    def close(self) -> None:
        if self.file.closed:
            return
        if self.rank == 0:
            sys.stdout, sys.stderr = self.streams
        warnings.showwarning = self.showwarning
        for name, handler in self.handlers.items():
            logging.getLogger(name).removeHandler(handler)
        self.file.close()
        atexit.unregister(self.close)


def start_wandb(project: str, mode: str, run_dir: Path, config: dict[str, Any]) -> Any:
    """A wandb run (rank 0 only) writing under ``RUN_DIR/wandb``; ``offline`` needs no network."""
    import wandb  # an extra: config validation checked that it is installed

    return wandb.init(project=project, mode=mode, dir=str(run_dir), config=config, name=Path(run_dir).name)


def progress(step: int, total: int, row: dict[str, Any]) -> str:
    """The console/``out.log`` line of a logged train step (as open_clip_train's ``Train Epoch`` lines)."""
    return (
        f"step {step}/{total} epoch {row['epoch']}: loss {row['loss']:.4f}  tau {row['tau']:.4f}  lr {row['lr']:.3g}  "
        f"{row['samples_per_s']:.1f} samples/s"
    )
