"""PROCMAP_QUERY lookups answer what the /proc/PID/maps text says, for every kind of mapping.

The host kernel (6.18) has the ioctl; the CUSE VM's Debian 6.1 kernel has not,
so the daemon's guest tests there run the text path (tests/realkernel).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import RequestRejected
from dtprobed.daemon.identity import AddressSpace, Mapping, identify
from dtprobed.oslib.procmaps import MapsQuery

# A process that maps one of each kind and waits: a memfd, an unlinked file, a
# shared file mapping, a file whose name holds a newline and a space, a
# PROT_NONE mapping; prints "ready".  (Named anonymous mappings would be one more
# kind, but this kernel is built without CONFIG_ANON_VMA_NAME.)
MAPPER = r"""
import mmap, os, sys
d = sys.argv[1]
keep = []
def mapfile(path, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC, unlink=False):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 3 * 4096)
    keep.append(mmap.mmap(fd, 3 * 4096, flags, prot))
    if unlink:
        os.unlink(path)
    os.close(fd)
m = os.memfd_create("code")
os.ftruncate(m, 4096)
keep.append(mmap.mmap(m, 4096, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC))
mapfile(os.path.join(d, "gone"), unlink=True)
mapfile(os.path.join(d, "shared"), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
mapfile(os.path.join(d, "new\nline (deleted)"))
keep.append(mmap.mmap(-1, 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, 0))
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def mapper(tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = subprocess.Popen(
        [sys.executable, "-c", MAPPER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[0] == "ready", line
    yield proc
    proc.communicate("")


def _by_text(pid: int) -> tuple[AddressSpace, list[Mapping]]:
    space = AddressSpace.from_maps(Path(f"/proc/{pid}/maps").read_bytes(), pid)
    return space, space.mappings


def test_every_mapping_reads_the_same_from_the_kernel_and_from_the_text(mapper) -> None:  # type: ignore[no-untyped-def]
    pid = mapper.pid
    text_space, mappings = _by_text(pid)
    paths = [m.path for m in mappings]
    # what this test is about is really there
    assert any(p == "/memfd:code (deleted)" for p in paths), paths
    assert any(p.endswith("/gone (deleted)") for p in paths), paths
    assert any(p.endswith("/new\\012line (deleted)") for p in paths), paths
    assert "[heap]" in paths and "[stack]" in paths, paths
    assert any(m.perms.endswith("s") for m in mappings)
    assert any(m.perms == "---p" for m in mappings)
    kernel = AddressSpace.of_process(pid)
    try:
        for m in mappings:
            if m.path == "[vsyscall]":  # listed by the text, not a mapping of the process
                continue
            assert kernel.find(m.start) == m, m
            assert kernel.find(m.end - 1) == m, m
        # below, between and above the mappings: nothing, in both
        gaps = [0, 4095, mappings[0].start - 1]
        gaps += [a.end for a, b in itertools.pairwise(mappings) if a.end < b.start]
        for addr in gaps:
            assert text_space.find(addr) is None and kernel.find(addr) is None, hex(addr)
        assert kernel.find(1 << 63) is None and kernel.find(-1) is None
        # the whole list, when asked for, is the text's
        assert kernel.mappings == mappings
    finally:
        kernel.close()


def test_an_objects_first_mapping_is_the_same_from_the_kernel_and_from_the_text() -> None:
    """HASUSDT's load base: the walk down the object's mappings finds what the text does,
    for every file this process maps as one run of adjoining mappings (as ld.so loads an
    object; other tests of this process may have left a file mapped twice, apart)."""
    pid = os.getpid()
    text_space, mappings = _by_text(pid)
    runs: dict[tuple[int, int], list[list[Mapping]]] = {}
    for m in mappings:
        if m.file_backed:
            file_runs = runs.setdefault((m.dev, m.ino), [])
            if file_runs and file_runs[-1][-1].end == m.start:
                file_runs[-1].append(m)
            else:
                file_runs.append([m])
    loaded = {key: r[0] for key, r in runs.items() if len(r) == 1 and r[0][0].offset == 0}
    assert len(loaded) >= 3, loaded  # python, libc, ld.so at least
    kernel = AddressSpace.of_process(pid)
    try:
        for m in mappings:
            run = loaded.get((m.dev, m.ino))
            if run is not None:
                assert kernel.object_start(m) == run[0] == text_space.first_of(m.dev, m.ino), m
    finally:
        kernel.close()


def test_a_lookup_after_the_process_is_gone_is_refused_not_a_crash() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    first = _by_text(proc.pid)[1][0]
    space = AddressSpace.of_process(proc.pid)
    try:
        assert space.find(first.start) == first
        proc.communicate(b"")
        with pytest.raises(RequestRejected) as info:
            space.find(first.start)
        assert "process dead" in info.value.reason
    finally:
        space.close()
    with pytest.raises(ValueError, match="closed"):
        space.find(first.start)  # a closed space answers nothing (rather than "unmapped")


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_identify_holds_the_maps_file_until_close_and_no_longer() -> None:
    keep = mmap.mmap(-1, 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(keep))
    before = _open_fds()
    for _ in range(50):
        caller = identify(os.getpid(), addr)
        assert (caller.dev, caller.ino) == (0, addr)
        caller.close()
    assert _open_fds() - before == set()
    with pytest.raises(RequestRejected):
        identify(os.getpid(), 8)  # unmapped: refused, and nothing left open
    assert _open_fds() - before == set()


def test_maps_query_of_a_missing_process_is_oserror() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(OSError):
        MapsQuery.open(proc.pid)
