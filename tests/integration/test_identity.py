"""Caller identity from /proc: parsing edge cases, and real processes and threads."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common.errors import RequestRejected
from dtprobed.daemon.identity import (
    identify,
    tgid_of,
)
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
