"""Loader measurements: bytes read from shard files at the system-call level (every library's reads, every
process of a command), and the ``fastclip-ds bench-data`` comparison with OpenCLIP's webdataset pipeline."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

READ_CALLS = "read,pread64,readv,preadv,preadv2"
_READ = re.compile(r"^\w+\(\d+<(?P<path>[^>]*)>.*\)\s+=\s+(?P<n>\d+)$")


def shard_bytes_read(cmd: list[str], shard_dir: str | os.PathLike, cwd: str | os.PathLike | None = None) -> int:
    """Bytes that ``cmd`` and every process it forks read from files under ``shard_dir`` (``strace -ff -y``, one
    trace file per process so no call is split over lines). Raises ``RuntimeError`` if ``cmd`` fails."""
    if shutil.which("strace") is None:
        raise RuntimeError("strace is not installed (apt-get install strace)")
    root = os.path.realpath(shard_dir) + os.sep
    with tempfile.TemporaryDirectory() as tmp:
        trace = ["strace", "-ff", "-qq", "-y", "-e", f"trace={READ_CALLS}", "-o", f"{tmp}/t", *cmd]
        proc = subprocess.run(trace, cwd=cwd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        total = 0
        for path in Path(tmp).iterdir():
            for line in path.read_text(errors="replace").splitlines():
                m = _READ.match(line)
                if m and m["path"].startswith(root):
                    total += int(m["n"])
    return total
