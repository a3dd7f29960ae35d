"""Caller identity from /proc: parsing edge cases, and real processes and threads."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common.errors import RequestRejected
from dtprobed.daemon.identity import (
    AddressSpace,
    glibc_makedev,
    identify,
    parse_maps,
    parse_start_time,
    tgid_of,
)
from tests.support.stash_view import glibc_dev


def test_glibc_makedev_matches_reference() -> None:
    assert glibc_makedev(0xFD, 0x00) == 64768  # reference §4.1: fd:00
    assert glibc_makedev(0x103, 0x1234) == ((0x103 << 8) | 0x34 | (0x1200 << 12))
    assert glibc_makedev(0x1000, 0) == 0x1000 << 32


def test_start_time_after_the_last_paren() -> None:
    # comm may hold spaces and ')': fields are counted after the last ')'
    stat = ("42 (a) b) (c d) " + " ".join(str(k) for k in range(3, 53))).encode()
    assert parse_start_time(stat) == 22


def test_maps_line_shapes() -> None:
    text = (
        b"7f00-8f00 r-xp 00001000 fd:01 123   /usr/lib/libx.so\n"
        b"9000-a000 rw-p 00000000 00:00 0 \n"
        b"a000-b000 r-xp 00000000 00:2f 77  /tmp/with space (deleted)\n"
        b"c000-d000 rw-p 00000000 00:00 0   [heap]\n"
    )
    lib, anon, deleted, heap = parse_maps(text)
    assert (lib.start, lib.end, lib.dev, lib.ino, lib.path) == (
        0x7F00,
        0x8F00,
        glibc_makedev(0xFD, 1),
        123,
        "/usr/lib/libx.so",
    )
    assert lib.executable and lib.file_backed
    assert not anon.file_backed and anon.path == ""
    assert deleted.file_backed and deleted.path == "/tmp/with space (deleted)"
    assert not heap.file_backed
    space = AddressSpace([heap, deleted, anon, lib])
    space.check_tracepoints([0xA000, 0xA010, 0x7F00, 0x8EFF])  # deleted file is fine
    for addr, why in [
        (0x9000, "not executable"),
        (0x8F00, "not mapped"),
        (0xC100, "not executable"),
    ]:
        with pytest.raises(RequestRejected) as info:
            space.check_tracepoints([0xA000, addr])
        assert info.value.errno == errno.EINVAL and why in info.value.reason
        assert f"{addr:#x}" in info.value.reason


def test_lazy_index_agrees_with_a_full_parse() -> None:
    text = Path(f"/proc/{os.getpid()}/maps").read_bytes()
    full = parse_maps(text)
    space = AddressSpace.from_maps(text)
    for m in full:
        assert space.find(m.start) == m
        assert space.find(m.end - 1) == m
    assert space.mappings == full
    gaps = [a.end for a, b in itertools.pairwise(full) if a.end < b.start]
    assert gaps and all(space.find(addr) is None for addr in gaps)


@pytest.mark.parametrize(
    "text",
    [
        b"2000-3000 r-xp 0 fd:01 1 /a\n1000-1800 r-xp 0 fd:01 1 /b\n",  # unsorted
        b"3000-2000 r-xp 0 fd:01 1 /a\n",  # empty range
        b"zz-3000 r-xp 0 fd:01 1 /a\n",
        b"garbage\n",
    ],
)
def test_malformed_maps_are_refused(text: bytes) -> None:
    with pytest.raises(ValueError):
        AddressSpace.from_maps(text)


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
