"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default sklearn-digits dataset (train shards + CLIP_benchmark eval split), written once per session."""
    from fastclip_ds.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("data") / "digits")
