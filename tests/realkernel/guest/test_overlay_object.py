"""HASUSDT of an object on overlayfs, on the VM's Debian 6.1 kernel (in the guest only).

On that kernel ``/proc/PID/maps`` names an overlay file by its *layer's* device,
while the file opened through ``/proc/PID/map_files`` is the overlay's: the same
inode number, another ``st_dev``.  The guest's root is an overlay (a tmpfs upper
layer over the host's files), so a copy of an object made there shows it; this is
what a USDT program in a container sees on a Debian 12 host.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_notes_register import NOTES, Registrant
from tests.support.daemon import DaemonHandle, finish, start_daemon
from tests.support.stash_view import generations


@pytest.fixture
def on_overlay() -> Iterator[Path]:
    # /opt is on the guest's overlay root (/tmp, /var/tmp and /run are tmpfs there)
    work = Path("/opt/dtprobed-overlay-test")
    work.mkdir(parents=True, exist_ok=True)
    obj = work / "libfx.so"
    shutil.copy(NOTES / "libfx.so", obj)
    try:
        yield obj
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonHandle]:
    handle = start_daemon(tmp_path, extra_args=["--device-mode", "fuse", "-t", "30"])
    try:
        yield handle
    finally:
        finish(handle)


def _maps_key(pid: int, path: Path) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.endswith(str(path)):
            fields = line.split()
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            return os.makedev(major, minor), int(fields[4])
    raise AssertionError(f"{path} is not mapped in {pid}")


def test_an_object_on_overlayfs_registers(on_overlay: Path, daemon: DaemonHandle) -> None:
    st = on_overlay.stat()
    reg = Registrant(on_overlay, daemon.device)
    try:
        maps_dev, maps_ino = _maps_key(reg.pid, on_overlay)
        assert maps_ino == st.st_ino
        assert maps_dev != st.st_dev, (
            "this kernel names the overlay file by the overlay's device in maps: "
            "the case this test is for does not arise here"
        )
        assert (reg.gen, reg.errno) == (0, 0), daemon.log_text()[-2000:]
        key = f"{maps_dev}-{maps_ino}"  # the stash names the mapping as maps does
        assert generations(daemon.state_dir, reg.pid) == {0: key}
        daemon.verify()
    finally:
        reg.exit()
