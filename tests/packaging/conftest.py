"""Fixtures for the packaging tests: one staged installation per session.

``packaging/install.sh --root DIR --no-start`` is what a packager runs; it
builds a virtual environment and installs the package into it, which takes a
few seconds, so the staged tree is made once and shared (read-only) by every
test of this directory.  The real host is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "packaging" / "install.sh"
UNINSTALL = REPO / "packaging" / "uninstall.sh"
PREFIX = "/usr/local"


@dataclass(frozen=True)
class StagedInstall:
    """An installation staged under ``root`` by install.sh (``prefix`` as on the target)."""

    root: Path
    prefix: str
    output: str

    __test__ = False

    def path(self, target_path: str) -> Path:
        """Where the file that will live at *target_path* is in the staging tree."""
        return self.root / target_path.lstrip("/")


def run_install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # The installer must not depend on the caller's environment: no venv of ours.
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--no-start", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="session")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StagedInstall]:
    root = tmp_path_factory.mktemp("stage")
    result = run_install(root)
    assert result.returncode == 0, f"install.sh failed:\n{result.stdout}\n{result.stderr}"
    yield StagedInstall(root, PREFIX, result.stdout + result.stderr)
    shutil.rmtree(root, ignore_errors=True)


def in_staged_namespace(staged: StagedInstall, script: str) -> subprocess.CompletedProcess[str]:
    """Run *script* (sh) in a private mount namespace where the staged prefix is mounted
    over the real one, so installed paths resolve exactly as on an installed host."""
    prefix = staged.prefix
    wrapper = f'mount --bind "$1{prefix}" "{prefix}" && shift && {script}'
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            wrapper,
            "sh",
            str(staged.root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
