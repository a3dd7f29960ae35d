"""A state directory that is not in memory: the daemon warns once at start-up, with the cost.

Upstream assumes /run is a tmpfs; on this machine kind it is ext4 (so are
/tmp and /var/tmp), and /dev/shm is a tmpfs.  A private daemon on each:
on the disk one its log has the warning exactly once — after start-up, a
registration and a forced reparse — naming the file system and a measured
per-file cost; on the tmpfs one, none.  The daemon's own measurement files
are gone from the state directory.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import Clients, code_dof, write_dof
from tests.support.daemon import DaemonHandle, finish, start_daemon

WARNING = re.compile(
    r"WARNING: state directory (\S+) is on (\S+), not tmpfs: each stash file costs "
    r"~(\d+\.\d+) ms here .* a 2000-probe registration spends at least ~(\d+\.\d) s writing the stash"
)


def fs_type_name(path: Path) -> str:
    """The file system type of *path* as stat(1) names it, independent of the daemon's code."""
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


#: (where the state directory goes, what stat(1) must call that file system there,
#: whether the daemon must warn) on this machine kind.
PLACES = [("/var/tmp", "ext2/ext3", True), ("/dev/shm", "tmpfs", False)]


@pytest.fixture(params=PLACES, ids=[place for place, _, _ in PLACES])
def place(request: pytest.FixtureRequest) -> Iterator[tuple[Path, bool]]:
    parent, kind, warns = request.param
    # stat(1), not the daemon's code, says what the file system is.
    assert fs_type_name(Path(parent)) == kind, f"{parent} is not {kind} on this machine"
    path = Path(tempfile.mkdtemp(prefix="dtprobed-statedir-", dir=parent))
    try:
        yield path, warns
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_daemon(tmp_path: Path, state_dir: Path) -> tuple[DaemonHandle, str]:
    """Start, register once, force a reparse, stop: the daemon's whole log."""
    handle = start_daemon(tmp_path, state_dir=state_dir, debug=False)
    clients = Clients(tmp_path, handle.device)
    try:
        client = clients.start()
        assert client.register(write_dof(tmp_path, "probes", code_dof().data)).get("gen") == 0
        handle.proc.send_signal(signal.SIGUSR2)
        handle.wait_for("the forced reparse", lambda: "forced reparse" in handle.log_text())
        client.exit()
    except BaseException:
        handle.cleanup_hard()
        raise
    finally:
        clients.close()
    finish(handle)
    return handle, handle.log_text()


def test_warns_once_when_the_state_directory_is_not_tmpfs(
    tmp_path: Path, place: tuple[Path, bool]
) -> None:
    state_dir, warns = place
    handle, log = run_daemon(tmp_path, state_dir)
    warnings = WARNING.findall(log)
    if warns:
        assert len(warnings) == 1, log
        assert log.count("not tmpfs") == 1, log
        (where, fs, per_file, _total) = warnings[0]
        assert (where, fs) == (str(state_dir), "ext4")
        assert float(per_file) > 0
        assert "Mount a tmpfs on it" in log
    else:
        assert warnings == [], log
        assert "not tmpfs" not in log, log
    # The measurement left nothing behind: the state directory is the stash alone.
    assert sorted(p.name for p in handle.state_dir.iterdir()) == ["probes", "stash"]
