"""Caller identity from /proc: parsing edge cases, and real processes and threads."""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from common.errors import RequestRejected
from dtprobed.daemon.identity import (
    AddressSpace,
    identify,
    tgid_of,
)
from tests.support.client import libc_text, map_fd
from tests.support.stash_view import glibc_dev


def test_pid_zero_is_refused() -> None:
    with pytest.raises(RequestRejected) as info:
        identify(0, 0x1000)
    assert info.value.errno == errno.EINVAL and "pid namespace" in info.value.reason


def test_thread_resolves_to_its_process() -> None:
    tids: list[int] = []
    done = threading.Event()

    def run() -> None:
        tids.append(threading.get_native_id())
        done.wait(10)

    t = threading.Thread(target=run)
    t.start()
    try:
        while not tids:
            pass
        assert tids[0] != os.getpid()
        assert tgid_of(tids[0]) == os.getpid()
        caller = identify(tids[0], id(tids))  # an address on our heap: anonymous
        try:
            assert caller.pid == os.getpid()
            assert (caller.dev, caller.ino) == (0, id(tids))
            exe = os.stat(os.path.realpath(sys.executable))
            assert (caller.exec_dev, caller.exec_ino) == (glibc_dev(exe.st_dev), exe.st_ino)
            assert caller.exec_token.startswith("at_random:")
        finally:
            caller.close()
    finally:
        done.set()
        t.join()


def test_file_mapping_key_and_exec_token_change_on_exec(tmp_path: Path) -> None:
    # The same binary exec'd twice gets a different token (ASLR on, as on any normal system).
    code = "import sys; print('up', flush=True); sys.stdin.read()"
    tokens = []
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
            with open(f"/proc/{proc.pid}/maps") as f:
                first = f.readline()
            start = int(first.split("-")[0], 16)
            caller = identify(proc.pid, start)
            tokens.append(caller.exec_token)
            assert caller.ino != 0 and caller.dev != 0  # the executable's own mapping
            caller.close()
        finally:
            proc.communicate(b"")
    if Path("/proc/sys/kernel/randomize_va_space").read_text().strip() != "0":
        assert tokens[0] != tokens[1]


def test_dead_process_is_einval() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(RequestRejected) as info:
        identify(proc.pid, 0x1000)
    assert info.value.errno == errno.EINVAL


def _map_exec(fd: int, *, shared: bool = False) -> int:
    flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
    return map_fd(fd, 4096, mmap.PROT_READ | mmap.PROT_EXEC, flags, None)


def test_anonymous_dof_code_is_judged_by_the_file_not_the_maps_text(tmp_path: Path) -> None:
    """The rule for DOF in anonymous memory, on real mappings of this process.

    Only an executable private mapping of an unlinked regular file (or a memfd)
    passes; the check reads the file through /proc/PID/map_files, so a named
    file whose name ends in " (deleted)" fails like any named file."""
    page = b"\xcc" * 4096
    memfd = os.memfd_create("code", os.MFD_CLOEXEC)
    os.write(memfd, page)
    unlinked_path = tmp_path / "unlinked"
    unlinked_path.write_bytes(page)
    named_path = tmp_path / "named"
    named_path.write_bytes(page)
    fake_path = tmp_path / "x (deleted)"
    fake_path.write_bytes(page)
    fds = {
        "memfd": memfd,
        "unlinked": os.open(unlinked_path, os.O_RDONLY | os.O_CLOEXEC),
        "named": os.open(named_path, os.O_RDONLY | os.O_CLOEXEC),
        "fake": os.open(fake_path, os.O_RDONLY | os.O_CLOEXEC),
        "zero": os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC),
    }
    try:
        addrs = {
            "memfd": _map_exec(fds["memfd"]),
            "unlinked": _map_exec(fds["unlinked"]),
            "named": _map_exec(fds["named"]),
            "x (deleted)": _map_exec(fds["fake"]),
            "shared memfd": _map_exec(fds["memfd"], shared=True),
            "private /dev/zero": _map_exec(fds["zero"]),
            "shared /dev/zero": _map_exec(fds["zero"], shared=True),
        }
        unlinked_path.unlink()
        libc = libc_text()
        assert libc
        space = AddressSpace.from_maps(Path("/proc/self/maps").read_bytes(), os.getpid())
        assert space.find(addrs["x (deleted)"]).path.endswith("x (deleted)")  # type: ignore[union-attr]
        space.check_tracepoints([addrs["memfd"] + 0x10, addrs["memfd"] + 0xFF0], object_key=None)
        space.check_tracepoints([addrs["unlinked"] + 0x10], object_key=None)
        refusals = {
            "named": "of a named file",
            "x (deleted)": "of a named file",
            "shared memfd": "shared",
            "private /dev/zero": "not of a regular file",
            "shared /dev/zero": "shared",
            "libc": "of a named file",
        }
        for what, why in refusals.items():
            addr = libc if what == "libc" else addrs[what]
            with pytest.raises(RequestRejected) as info:
                space.check_tracepoints([addrs["memfd"], addr + 0x10], object_key=None)
            assert info.value.errno == errno.EINVAL and why in info.value.reason, what
        # File DOF: its own file only; libc and another file are refused.
        memfd_map = space.find(addrs["memfd"])
        assert memfd_map is not None
        own = (memfd_map.dev, memfd_map.ino)
        space.check_tracepoints([addrs["memfd"] + 4, addrs["shared memfd"] + 4], object_key=own)
        for addr in (libc, addrs["named"], addrs["unlinked"]):
            with pytest.raises(RequestRejected) as info:
                space.check_tracepoints([addr + 4], object_key=own)
            assert "not of the registering object" in info.value.reason
    finally:
        for fd in fds.values():
            os.close(fd)


NOBODY = 65534
#: Becomes nobody (after its imports: the interpreter lives under /root), maps root's file
#: (given) and a memfd of its own, both executable and private; prints both addresses,
#: then waits for stdin to close.
_NOBODY_CODE = r"""
import ctypes, json, mmap, os, sys
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
def code(fd):
    return libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_PRIVATE, fd, 0)
theirs = code(os.open(sys.argv[1], os.O_RDONLY))
mine = os.memfd_create("mine")
os.write(mine, b"\xcc" * 4096)
print(json.dumps({"theirs": theirs, "mine": code(mine)}), flush=True)
sys.stdin.read()
"""


def test_anonymous_dof_code_of_an_unprivileged_caller_must_be_its_own(tmp_path: Path) -> None:
    """An unlinked file of another user (e.g. the old libc, unlinked by an upgrade while
    every process still maps it) is no unprivileged caller's private code."""
    shared = Path(tempfile.mkdtemp(prefix="dtprobed-identity-"))
    try:
        shared.chmod(0o755)
        roots = shared / "roots-code"
        roots.write_bytes(b"\xcc" * 4096)
        roots.chmod(0o644)
        proc = subprocess.Popen(
            [sys.executable, "-c", _NOBODY_CODE, str(roots)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd="/",
        )
        try:
            assert proc.stdout is not None
            addrs = json.loads(proc.stdout.readline())
            roots.unlink()
            maps = Path(f"/proc/{proc.pid}/maps").read_bytes()
            space = AddressSpace.from_maps(maps, proc.pid)
            assert space.find(addrs["theirs"]).path.endswith("roots-code (deleted)")  # type: ignore[union-attr]
            space.check_tracepoints([addrs["mine"] + 0x10], object_key=None)
            with pytest.raises(RequestRejected) as info:
                space.check_tracepoints([addrs["theirs"] + 0x10], object_key=None)
            assert f"of a file of uid 0, not the caller's ({NOBODY})" in info.value.reason
        finally:
            proc.communicate(b"", timeout=30)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
