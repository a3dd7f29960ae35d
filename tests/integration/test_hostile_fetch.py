"""Hostile callers against a private daemon: DOF on a stalled FUSE file, huge header claims.

Each test runs a real hostile process and real benign clients against a real
daemon on the real FUSE device, and asserts that the benign clients'
registrations keep succeeding, nothing is lost, ``verify`` is clean and the
daemon stops on SIGTERM.  Latency under attack is measured in
``bench/bench_attack.py``, never here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import Clients, code_dof, write_dof
from tests.support.daemon import (
    REPO,
    STOP_TIMEOUT,
    DaemonFactory,
    DaemonHandle,
    mounted,
    status_kib,
)

pytestmark = pytest.mark.timeout(180)

#: A hostile client: maps FILE (a file of the stuck FUSE file system, or a DOF header
#: claiming more than it has), points dofhp_dof at it, becomes uid 65534 (nobody:
#: another user than the benign clients, which run as root) and calls ADDDOF COUNT
#: times on the helper it opened before.
HOSTILE = r"""
import ctypes, fcntl, json, mmap, os, sys
sys.path.insert(0, sys.argv[1])
from common.dof_build import build_helper
from common.ioctl import DTRACEHIOC_ADDDOF
device, path, size, count = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open(path, os.O_RDONLY)
os.fstat(fd)  # FUSE: learn the file's size (GETATTR) before mapping it
addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
dev = os.open(device, os.O_RDWR)
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)  # another user than the benign (root) clients
print(json.dumps({"ready": True, "addr": addr}), flush=True)
helper = bytearray(build_helper("hostile", addr=0, dof=addr))
results = []
for _ in range(count):
    try:
        results.append(fcntl.ioctl(dev, DTRACEHIOC_ADDDOF, helper, True))
    except OSError as err:
        results.append(-err.errno)
print(json.dumps({"results": results}), flush=True)
"""


def _hostile(device: Path, path: Path, size: int, count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOSTILE, str(REPO), str(device), str(path), str(size), str(count)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    hello = json.loads(proc.stdout.readline())
    assert hello["ready"], hello
    return proc


@contextlib.contextmanager
def stuck_fuse(
    mountpoint: Path, size: int = 1 << 20, *, withhold_getattr: bool = False
) -> Iterator[subprocess.Popen[str]]:
    """Our own tiny FUSE file system: one file whose READ (and GETATTR) is never answered."""
    mountpoint.write_bytes(b"")
    extra = ["--withhold-getattr"] if withhold_getattr else []
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.device.stuck_fuse",
            str(mountpoint),
            "--size",
            str(size),
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert server.stdout is not None
        assert json.loads(server.stdout.readline()) == {"mounted": True}
        yield server
    finally:
        if server.stdin is not None:
            server.stdin.close()  # unmounts: every withheld READ fails, stuck readers wake
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _benign_rounds(clients: Clients, dof: Path, rounds: int) -> list[dict[str, Any]]:
    """*rounds* fresh clients, each registering once; their answers."""
    answers = []
    for _ in range(rounds):
        client = clients.start()
        answers.append(client.register(dof))
    return answers


def test_dof_on_a_stalled_fuse_file_stalls_only_its_sender(
    daemon_factory: DaemonFactory, loose_clients: Clients, tmp_path: Path
) -> None:
    """Before: the device thread read the caller's memory itself, blocked in the page
    fault, and every client hung (even ``open()``); SIGTERM did nothing."""
    daemon = daemon_factory.start(extra_args=["--fetch-timeout", "0.5", "--max-stuck-fetches", "2"])
    dof = write_dof(tmp_path, "ok", code_dof().data)
    with stuck_fuse(tmp_path / "stuck") as server:
        attacker = _hostile(daemon.device, tmp_path / "stuck", 1 << 20, 4)
        try:
            assert server.stdout is not None
            assert "read" in json.loads(server.stdout.readline())  # a fetch is stuck now
            # Other clients are served while the attacker's fetches hang in the kernel.
            answers = _benign_rounds(loose_clients, dof, 6)
            assert [a.get("gen") for a in answers] == [0] * 6, answers
            assert attacker.stdout is not None
            done = json.loads(attacker.stdout.readline())
            # The stuck one failed (abandoned after the fetch timeout); once two of its
            # helpers are stuck, the uid's further requests are refused at once.
            assert done["results"] == [-errno.EINVAL] * 4, done
            assert attacker.wait(10) == 0
            daemon.verify()
            assert {c.pid for c in loose_clients.started} <= set(daemon.stash_pids())
            # SIGTERM stops the daemon within its stop timeout although two fetch
            # helpers are still stuck in the kernel (SIGKILL does not end that wait).
            started = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(STOP_TIMEOUT) == 0
            assert time.monotonic() - started < STOP_TIMEOUT
            daemon.stopped = True
            assert not mounted(daemon.device)
        finally:
            if attacker.poll() is None:
                attacker.kill()
                attacker.wait()
    # The hostile server is gone: the abandoned helpers' waits ended, they are reaped.
    deadline = time.monotonic() + 10
    while daemon.session_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemon.session_alive()
    log = daemon.log_text()
    assert "fetch abandoned" in log and "Traceback" not in log


def test_header_only_claims_cost_only_what_is_read(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    """A DOF header claiming 256 MiB with nothing mapped after its page.

    Before: the daemon zero-filled ``dofh_loadsz`` bytes (~200 ms of device-thread
    time per claim) before reading anything.  Now the claim goes to the large lane,
    whose fetch reads into a growing buffer and stops at the first fault: the
    daemon's memory does not grow by the claimed size, and others are served."""
    header = bytearray(code_dof().data[:64])
    header[40:48] = (256 << 20).to_bytes(8, "little")  # dofh_loadsz
    claim = tmp_path / "claim.dof"
    claim.write_bytes(bytes(header) + bytes(4096 - 64))  # one page, then nothing
    dof = write_dof(tmp_path, "ok", code_dof().data)
    rss_before = _rss(daemon.pid)
    attacker = _hostile(daemon.device, claim, 4096, 40)
    answers = _benign_rounds(clients, dof, 4)
    assert attacker.stdout is not None
    done = json.loads(attacker.stdout.readline())
    assert done["results"] == [-errno.EINVAL] * 40
    assert [a.get("gen") for a in answers] == [0] * 4, answers
    assert _peak(daemon.pid) - rss_before < 64 << 20  # never near one 256 MiB claim
    assert attacker.wait(10) == 0
    assert {c.pid for c in clients.started} <= set(daemon.stash_pids())
    daemon.verify()


def _rss(pid: int) -> int:
    return status_kib(pid, "VmRSS") << 10


def _peak(pid: int) -> int:
    return status_kib(pid, "VmHWM") << 10
