"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before anything (open_clip
# included) imports triton and before any kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default sklearn-digits dataset (train shards + CLIP_benchmark eval split), written once per session."""
    from fastclip_ds.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("data") / "digits")
