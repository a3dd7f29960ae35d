"""HASUSDT's caller identification: the object an address lies in, opened through map_files."""

from __future__ import annotations

import errno
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import RequestRejected
from dtprobed.daemon.identity import (
    FuseMountCache,
    fuse_devices,
    fuse_devices_in,
    identify_object,
)
from dtprobed.oslib.procfs import read_proc
from tests.integration.test_hostile_fetch import stuck_fuse
from tests.support.clients import wait_until
from tests.support.stash_view import glibc_dev

FIXTURES = Path(__file__).resolve().parents[1] / "parser" / "fixtures" / "notes"

# Maps a copy of an object at its three usual protections and waits: a stand-in
# for a program whose code lies in that object (the object is never run).
HOLDER = r"""
import mmap, os, sys
path = sys.argv[1]
size = os.path.getsize(path)
with open(path, "rb") as f:
    text = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ | mmap.PROT_EXEC, flags=mmap.MAP_PRIVATE)
    data = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ, flags=mmap.MAP_PRIVATE)
for line in open(f"/proc/{os.getpid()}/maps"):
    if line.rstrip().endswith(path) and " r-xp " in line:
        print(int(line.split("-")[0], 16), flush=True)
        break
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    obj = tmp_path / "libheld.so"
    shutil.copy(FIXTURES / "libfx.so", obj)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(obj)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        text_start = int(proc.stdout.readline())
        yield proc, obj, text_start
    finally:
        proc.communicate(b"")


def test_object_is_found_opened_and_named(
    holder: tuple[subprocess.Popen[bytes], Path, int],
) -> None:
    proc, obj, text_start = holder
    caller, found = identify_object(proc.pid, text_start + 16)
    try:
        st = obj.stat()
        assert caller.pid == proc.pid
        assert (caller.dev, caller.ino) == (glibc_dev(st.st_dev), st.st_ino)
        assert found.module == "libheld.so"
        assert found.size == st.st_size
        assert found.first.start <= text_start  # the lowest mapping of the file
        assert (found.first.dev, found.first.ino) == (caller.dev, caller.ino)
        assert os.pread(found.fd, 4, 0) == b"\x7fELF"  # the file itself, read-only
        assert os.fstat(found.fd).st_ino == st.st_ino
    finally:
        found.close()
        caller.close()


def test_unlinked_object_still_opens_through_map_files(
    holder: tuple[subprocess.Popen[bytes], Path, int],
) -> None:
    proc, obj, text_start = holder
    ino = obj.stat().st_ino
    obj.unlink()
    caller, found = identify_object(proc.pid, text_start)
    try:
        assert found.module == "libheld.so"  # " (deleted)" is not part of the name
        assert os.fstat(found.fd).st_ino == ino
    finally:
        found.close()
        caller.close()


def test_address_outside_any_file_mapping_is_einval() -> None:
    with pytest.raises(RequestRejected) as info:
        identify_object(os.getpid(), id(info))  # our heap: anonymous memory
    assert info.value.errno == errno.EINVAL
    assert "not in a file mapping" in info.value.reason
    with pytest.raises(RequestRejected) as info:
        identify_object(os.getpid(), 8)  # never mapped
    assert "not mapped" in info.value.reason


def test_object_on_a_fuse_file_system_is_refused_unopened(tmp_path: Path) -> None:
    """A FUSE server can leave our open or reads unanswered for ever (and the waiting
    thread cannot be killed): an object on a FUSE file system is refused before
    anything of it is opened.  The server here never answers READ, and reports each
    one it withholds: none may come."""
    with stuck_fuse(tmp_path / "stuck") as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path / "stuck")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            text = int(proc.stdout.readline())
            assert glibc_dev(os.stat(tmp_path / "stuck").st_dev) in fuse_devices(proc.pid)
            with pytest.raises(RequestRejected) as err:
                identify_object(proc.pid, text + 16)
            assert err.value.errno == errno.EINVAL
            assert "on a FUSE file system" in str(err.value)
            assert server.stdout is not None
            assert select.select([server.stdout], [], [], 0.2)[0] == []  # no READ sent
        finally:
            proc.kill()
            proc.wait()


def test_fuse_mounts_are_read_again_only_after_a_mount_changed(tmp_path: Path) -> None:
    """The FUSE devices of a namespace come from the cache until a mount or unmount
    there: a FUSE file system mounted after the first read is seen at the next one,
    and so is its unmount; nothing changed, nothing is read."""
    cache = FuseMountCache()
    me = os.getpid()
    try:
        before = cache.devices(me)
        assert cache.devices(me) == before == fuse_devices_in(read_proc(f"/proc/{me}/mountinfo"))
        assert cache.reads == 1
        with stuck_fuse(tmp_path / "stuck"):
            dev = glibc_dev(os.stat(tmp_path / "stuck").st_dev)
            assert dev not in before
            assert dev in cache.devices(me)
            assert cache.reads == 2
            assert dev in cache.devices(me)
            assert cache.reads == 2
        assert dev not in cache.devices(me)
        assert cache.reads == 3
    finally:
        cache.close()


def test_each_mount_namespace_has_its_own_entry_and_their_number_is_bounded(
    tmp_path: Path,
) -> None:
    """A process in another mount namespace is read on its own (its mounts are not
    ours), and at most *capacity* namespaces keep an open mountinfo file."""
    cache = FuseMountCache(capacity=1)
    other = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sleep", "60"],
    )
    try:
        wait_until(
            "the other namespace",
            lambda: _mount_ns_of(other.pid) not in (-1, _mount_ns_of(os.getpid())),
        )
        with stuck_fuse(tmp_path / "stuck"):  # mounted in our namespace only
            dev = glibc_dev(os.stat(tmp_path / "stuck").st_dev)
            assert dev in cache.devices(os.getpid())
            assert dev not in cache.devices(other.pid)
            assert cache.reads == 2
            assert len(cache) == 1  # ours was dropped (and its file closed) for the other's
            assert dev in cache.devices(os.getpid())
            assert cache.reads == 3
    finally:
        other.kill()
        other.wait()
        cache.close()
    assert len(cache) == 0


def _mount_ns_of(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return -1
