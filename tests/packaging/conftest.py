"""Fixtures for the packaging tests: one staged installation per session.

``packaging/install.sh --root DIR --no-start`` is what a packager runs; it
builds a virtual environment and installs the package into it, which takes a
few seconds, so the staged tree is made once and shared (read-only) by every
test of this directory.  The real host is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "packaging" / "install.sh"
UNINSTALL = REPO / "packaging" / "uninstall.sh"
PREFIX = "/usr/local"


#: The host's own daemon, when packaging/install.sh installed and started it here
#: (.ci/run does, before the tests): the private hosts must not disturb it.
HOST_HELPER = "/dev/dtrace/helper"
HOST_PID_FILE = Path("/run/dtprobed.pid")


@dataclass(frozen=True)
class HostDaemon:
    """What serves the host's helper: the pid of install.sh's daemon, the mounts on it."""

    pid: int | None
    mounts: tuple[str, ...]  # "mount-id fstype source" of each mount on HOST_HELPER

    @property
    def serving(self) -> bool:
        return self.pid is not None and bool(self.mounts)


def host_daemon() -> HostDaemon:
    pid = None
    with contextlib.suppress(OSError, ValueError):
        candidate = int(HOST_PID_FILE.read_text())
        if Path(f"/proc/{candidate}").exists():
            pid = candidate
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == HOST_HELPER:
                sep = fields.index("-")
                mounts.append(f"{fields[0]} {fields[sep + 1]} {fields[sep + 2]}")
    return HostDaemon(pid, tuple(mounts))


@pytest.fixture(scope="session", autouse=True)
def host_daemon_untouched() -> Iterator[HostDaemon]:
    """The packaging tests run beside the host's installed daemon and leave it serving.

    In CI (``.ci/run`` installs the daemon first, as the README says) it must be
    serving when they start; wherever it serves at the start, it must still be
    the same process on the same mount at the end, and the mount must answer.
    """
    before = host_daemon()
    if os.environ.get("CI") == "true":
        assert before.serving, f"CI installs dtprobed before the tests, but: {before}"
    yield before
    after = host_daemon()
    assert after == before, f"the host's dtprobed changed: {before} -> {after}"
    if before.serving:
        os.statvfs(HOST_HELPER)  # ENOTCONN if its daemon had gone
        assert before.pid is not None
        cmdline = Path(f"/proc/{before.pid}/cmdline").read_bytes().split(b"\0")
        assert b"/usr/local/sbin/dtprobed" in cmdline, cmdline


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


#: Where the private hosts (fresh-host.sh, nested-systemd.sh) show the test's WORK_DIR.
WORK_IN_NS = "/run/dtprobed-test"


def start_namespaced_client(pid1: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A fake USDT client inside the private host whose pid 1 is *pid1*.

    It registers ``WORK_IN_NS/probes.dof`` at start-up through that host's
    /dev/dtrace/helper; returns the process and its first JSON line.
    """
    client = subprocess.Popen(
        [
            "nsenter",
            "-t",
            str(pid1),
            "-m",
            "-p",
            f"--wd={REPO}",
            str(REPO / ".venv" / "bin" / "python"),
            "-m",
            "tests.support.client",
            "--device",
            "/dev/dtrace/helper",
            "--code-file",
            f"{WORK_IN_NS}/code.bin",
            "--register",
            json.dumps({"op": "register", "dof_file": f"{WORK_IN_NS}/probes.dof"}),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    hello: dict[str, Any] = json.loads(client.stdout.readline() or "{}")
    return client, hello
