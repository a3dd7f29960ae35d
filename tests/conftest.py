"""Fixtures every part of the suite may use."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shm() -> Iterator[Path]:
    """A state directory on tmpfs, as in production (/run is a tmpfs); not created yet."""
    d = Path(tempfile.mkdtemp(prefix="dtprobed-state-", dir="/dev/shm"))
    try:
        yield d / "run"
    finally:
        shutil.rmtree(d, ignore_errors=True)
