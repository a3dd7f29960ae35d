"""Fixtures of the integration suite: a private daemon, fake clients, shared directories."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import clients, loose_clients  # noqa: F401
from tests.support.daemon import daemon, daemon_factory  # noqa: F401


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user can read (device, code file, DOF files of other users)."""
    d = Path(tempfile.mkdtemp(prefix="dtprobed-hostile-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
