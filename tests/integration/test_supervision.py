"""Children that hang or die, and a daemon that is killed: requests fail cleanly, then work.

To make "killed mid-request" deterministic, a child is stopped (SIGSTOP), the
request is sent, and the test waits until the request's bytes are queued on
the child's stdin pipe (``FIONREAD`` on ``/proc/CHILD/fd/0``, a second open
of the same pipe) before killing it: the request is then provably in flight.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from dtprobed.daemon.receiver import SMALL_DOF
from tests.support.client import CODE_ADDR
from tests.support.clients import ClientHandle, Clients, code_dof, wait_until, write_dof
from tests.support.daemon import DaemonFactory, DaemonHandle, mounted
from tests.support.stash_view import generations, snapshot

pytestmark = pytest.mark.timeout(120)


def _queued_on_stdin(pid: int) -> int:
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    finally:
        os.close(fd)
    return int(struct.unpack("i", raw)[0])


def _kill_in_flight(daemon: DaemonHandle, child: int, client: ClientHandle, dof: Path) -> dict:
    """Stop *child*, send a registration, kill *child* once the request reached it."""
    os.kill(child, signal.SIGSTOP)
    try:
        client.send({"op": "register", "dof_file": str(dof)}, answer=False)
        daemon.wait_for("the request to reach the child", lambda: _queued_on_stdin(child) > 0)
    finally:
        os.kill(child, signal.SIGKILL)
    return client.read()


def _register_after_penalty(client: ClientHandle, dof: Path, role: str) -> dict[str, Any]:
    """Register again.  A parser that broke on a request penalises its sender's uid
    (docs/security.md, "Fairness"): refused at once (EINVAL) until the penalty
    (1 s at first) is over.  A broken stash writer penalises nobody."""
    answer = client.register(dof)
    if role == "writer":
        return answer
    assert answer.get("errno") == errno.EINVAL, answer  # the penalty
    deadline = time.monotonic() + 10
    while answer.get("errno") == errno.EINVAL and time.monotonic() < deadline:
        time.sleep(0.2)
        answer = client.register(dof)
    return answer


@pytest.mark.parametrize("role", ["parser", "writer"])
def test_child_killed_mid_request(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path, role: str
) -> None:
    dof = write_dof(tmp_path, "k", code_dof().data)
    client = clients.start()
    assert client.register(dof)["gen"] == 0  # children are up
    before = snapshot(daemon.state_dir)
    victim = daemon.children()[role][0]
    answer = _kill_in_flight(daemon, victim, client, dof)
    assert answer.get("errno") == errno.EINVAL, answer
    assert snapshot(daemon.state_dir) == before
    # the next request works, with a new child (after the sender's penalty: the
    # parser died on its request, and the daemon cannot tell who killed it)
    assert _register_after_penalty(client, dof, role)["gen"] == 1
    assert victim not in daemon.children()[role]
    daemon.verify()


@pytest.mark.parametrize("role", ["parser", "writer"])
def test_silent_child_times_out(
    daemon_factory: DaemonFactory, loose_clients: Clients, tmp_path: Path, role: str
) -> None:
    daemon = daemon_factory.start(extra_args=["-t", "1"])
    dof = write_dof(tmp_path, "t", code_dof().data)
    client = loose_clients.start()
    assert client.register(dof)["gen"] == 0
    before = snapshot(daemon.state_dir)
    victim = daemon.children()[role][0]
    os.kill(victim, signal.SIGSTOP)
    try:
        answer = client.register(dof)  # the child never answers: -t 1 fires
    finally:
        with contextlib.suppress(ProcessLookupError):  # normally killed by the timeout
            os.kill(victim, signal.SIGCONT)
    assert answer.get("errno") == errno.EINVAL, answer
    if role == "parser":
        assert snapshot(daemon.state_dir) == before
    assert _register_after_penalty(client, dof, role).get("gen") is not None
    assert victim not in daemon.children()[role]  # killed and replaced
    daemon.verify()


def test_large_dof_parser_killed_mid_request(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    probes = [
        ProbeSpec(f"f{i}", f"p{i}", [0x4], addr=CODE_ADDR + 0x20 * i, native=["int", "long"])
        for i in range(1000)
    ]
    large = build_dof([ProviderSpec("large", probes)]).data
    assert len(large) > SMALL_DOF  # goes to the large-DOF lane and its own parser
    path = write_dof(tmp_path, "large", large)
    client = clients.start()
    small_parser = daemon.children()["parser"]
    assert client.register(path)["gen"] == 0  # starts the large-DOF parser
    (large_parser,) = set(daemon.children()["parser"]) - set(small_parser)
    answer = _kill_in_flight(daemon, large_parser, client, path)
    assert answer.get("errno") == errno.EINVAL, answer
    assert _register_after_penalty(client, path, "parser")["gen"] == 1
    assert daemon.children()["parser"][0] == small_parser[0]  # the small lane never noticed
    daemon.verify()


def test_daemon_sigkilled_and_restarted(
    daemon_factory: DaemonFactory, loose_clients: Clients, tmp_path: Path
) -> None:
    first = daemon_factory.start()
    dof = write_dof(tmp_path, "r", code_dof().data)
    survivor = loose_clients.start()
    leaver = loose_clients.start()
    assert survivor.register(dof)["gen"] == 0
    assert leaver.register(dof)["gen"] == 0
    first.kill()
    assert mounted(first.device)  # stale: nobody serves it
    wait_until("the old daemon's children to exit", lambda: not first.session_alive())
    assert leaver.exit() == 0  # exits while no daemon runs
    second = daemon_factory.start()
    second.verify()
    # start-up pruned the process that died meanwhile; the live one is intact
    assert second.stash_pids() == [survivor.pid]
    assert list(generations(second.state_dir, survivor.pid)) == [0]
    assert survivor.register(dof)["gen"] == 1
    # and the survivor is watched by the new daemon
    survivor.kill()
    second.wait_for("the survivor pruned", lambda: second.stash_pids() == [])
    second.verify()


def test_writer_that_cannot_restart_makes_the_daemon_exit_2(
    daemon_factory: DaemonFactory, loose_clients: Clients, tmp_path: Path
) -> None:
    daemon = daemon_factory.start()
    dof = write_dof(tmp_path, "w", code_dof().data)
    client = loose_clients.start()
    assert client.register(dof)["gen"] == 0
    # Pull the state directory away and kill the writer: no new writer can start.
    daemon.state_dir.rename(tmp_path / "run.moved")
    daemon.state_dir.write_text("not a directory")
    os.kill(daemon.writer_pid(), signal.SIGKILL)
    answers = []
    while daemon.proc.poll() is None and len(answers) < 20:
        answer = client.register(dof)
        if answer.get("errno") != errno.EINVAL:
            # The daemon gave up: the kernel ends a request in flight when the device
            # goes (ECONNABORTED or ENOTCONN); an open during the teardown gets one of
            # those, or ENOENT once the device file is removed.
            gone = (errno.ECONNABORTED, errno.ENOTCONN)
            if answer.get("stage") == "open":
                gone = (errno.ECONNABORTED, errno.ENOTCONN, errno.ENOENT)
            assert answer.get("errno") in gone, answer
            break
        answers.append(answer)
    assert len(answers) >= 1
    assert daemon.proc.wait(30) == 2  # restartable: systemd may try again
    daemon.stopped = True
    assert "stash writer failed" in daemon.log_text()
    assert not mounted(daemon.device)
