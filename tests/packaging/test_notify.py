"""The daemon started the way the unit starts it: ``-F`` with systemd's notify protocol.

The test plays systemd: it binds the ``NOTIFY_SOCKET`` datagram socket, sets
``WATCHDOG_USEC``, and starts ``dtprobed -F`` on a stash prepared to need
start-up work — one registration of a process that has died since (must be
pruned) and one whose ``parsed/version`` is outdated (must be reparsed).
``READY=1`` must come only once both are done: when it arrives the daemon is
frozen (SIGSTOP) and the stash inspected.  Then ``WATCHDOG=1`` must keep
coming, and SIGTERM must bring ``STOPPING=1`` and exit status 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.stash_format import DOF_PARSED_VERSION
from tests.support.clients import Clients, code_dof, write_dof
from tests.support.daemon import REPO, detach, finish, mounted, start_daemon

NOTIFY_TIMEOUT = 30.0
#: Small, so a handful of pings arrive quickly (the daemon pings at half of it).
WATCHDOG_USEC = 200_000


def receive(sock: socket.socket, proc: subprocess.Popen[bytes], log: Path) -> dict[str, str]:
    """The next notification, as KEY=VALUE pairs; fails if the daemon exits first."""
    deadline = time.monotonic() + NOTIFY_TIMEOUT
    while True:
        sock.settimeout(0.1)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            if proc.poll() is not None:
                pytest.fail(f"daemon exited ({proc.returncode}):\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no notification in {NOTIFY_TIMEOUT} s:\n{log.read_text()}")
            continue
        return dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)


def mapping_dirs(state_dir: Path, pid: int) -> list[Path]:
    pid_dir = state_dir / "stash" / "dof-pid" / str(pid)
    return [
        p
        for p in pid_dir.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
    ]


@pytest.mark.timeout(180)
def test_ready_after_prune_and_reparse_then_watchdog(tmp_path: Path) -> None:
    dof = write_dof(tmp_path, "probes", code_dof().data)
    state_dir = tmp_path / "run"
    device = tmp_path / "helper"
    clients = Clients(tmp_path, device)
    try:
        # 1. A stash with two registered processes, left by a daemon that stopped.
        first = start_daemon(tmp_path, name="first")
        try:
            survivor = clients.start()
            doomed = clients.start()
            assert survivor.register(dof).get("gen") == 0
            assert doomed.register(dof).get("gen") == 0
        except BaseException:
            first.cleanup_hard()
            raise
        finish(first)
        doomed.kill()  # dies while no daemon runs: only start-up pruning can see it
        (mapping,) = mapping_dirs(state_dir, survivor.pid)
        version_file = mapping / "parsed" / "version"
        assert struct.unpack("=Q", version_file.read_bytes()) == (DOF_PARSED_VERSION,)
        version_file.write_bytes(struct.pack("=Q", DOF_PARSED_VERSION - 1))
        assert (state_dir / "stash" / "dof-pid" / str(doomed.pid)).exists()

        # 2. Start it as systemd does, with a notify socket we read.
        notify_path = tmp_path / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify_path))
        log_path = tmp_path / "unit-like.log"
        env = dict(os.environ)
        env.update(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        env.pop("WATCHDOG_PID", None)
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dtprobed",
                    "-F",
                    "--device",
                    str(device),
                    "--device-mode",
                    "fuse",
                    "-s",
                    str(state_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
                env=env,
            )
        try:
            before_ready: list[dict[str, str]] = []
            while "READY" not in (message := receive(sock, proc, log_path)):
                before_ready.append(message)
            # Freeze it where READY=1 left it, and look.
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                assert message["READY"] == "1"
                assert message.get("MAINPID") == str(proc.pid)
                # start-up only keeps the watchdog fed (and extends the start timeout)
                assert all(set(m) <= {"WATCHDOG", "EXTEND_TIMEOUT_USEC"} for m in before_ready), (
                    f"notifications before READY=1: {before_ready}"
                )
                assert not (state_dir / "stash" / "dof-pid" / str(doomed.pid)).exists(), (
                    "READY=1 before the dead process was pruned"
                )
                assert struct.unpack("=Q", version_file.read_bytes()) == (DOF_PARSED_VERSION,), (
                    "READY=1 before the outdated mapping was reparsed"
                )
                assert (state_dir / "probes" / str(survivor.pid)).is_dir()
                assert mounted(device), "READY=1 before the helper device is served"
            finally:
                os.kill(proc.pid, signal.SIGCONT)

            # 3. The watchdog keeps being fed.
            pings = 0
            while pings < 5:
                message = receive(sock, proc, log_path)
                assert set(message) <= {"WATCHDOG", "STATUS"}, message
                pings += message.get("WATCHDOG") == "1"

            # The daemon still serves: the survivor registers again.
            assert survivor.register(dof).get("gen") == 1

            # 4. SIGTERM: STOPPING=1, then a clean exit.
            proc.send_signal(signal.SIGTERM)
            while "STOPPING" not in (message := receive(sock, proc, log_path)):
                assert message.get("WATCHDOG") == "1", message
            assert proc.wait(30) == 0, log_path.read_text()
            assert not mounted(device)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
            if mounted(device):
                detach(device)
            sock.close()
        log = log_path.read_text()
        assert f"pruned 1 dead or exec'd processes: {doomed.pid}" in log, log
        assert "reparse: 1 mappings reparsed, 0 failed" in log, log
        assert "Traceback" not in log, log
    finally:
        clients.close()
