"""Housekeeping does not stop the daemon serving: a forced reparse (SIGUSR2).

The forced reparse runs on the maintenance thread, one mapping per parse and
per stash-writer exchange, so a registration gets the writer between two
mappings, and the main loop keeps reading the device and feeding the
watchdog.  Both are checked as *orderings* in the daemon's own records —
its log lines (``-d``: one DEBUG line per reparsed mapping) and the
notifications it sends — never as durations.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from tests.support.client import CODE_ADDR
from tests.support.clients import Clients, code_dof, write_dof
from tests.support.daemon import finish, start_daemon

MAPPINGS = 20
PROBES_PER_MAPPING = 500  # 10 000 probes in all
WATCHDOG_USEC = 200_000  # the daemon pings every 0.1 s


def big_dof(index: int) -> bytes:
    """500 probes, one tracepoint each, all inside the clients' shared text mapping."""
    probes = [
        ProbeSpec(
            func=f"fn{index}_{i}",
            name=f"p{i}",
            offsets=[0x10],
            addr=CODE_ADDR + 0x40 * i,
            native=["int", "long"],
        )
        for i in range(PROBES_PER_MAPPING)
    ]
    return build_dof([ProviderSpec(f"reparse{index}", probes)]).data


def line_index(lines: list[str], needle: str) -> int:
    for i, line in enumerate(lines):
        if needle in line:
            return i
    raise AssertionError(f"no log line with {needle!r}")


@pytest.mark.timeout(600)
def test_registration_and_watchdog_during_a_long_forced_reparse(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    handle = start_daemon(
        tmp_path, env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    )
    clients = Clients(tmp_path, handle.device)
    try:
        owner = clients.start()
        for i in range(MAPPINGS):  # 20 distinct files: 20 mappings to reparse
            assert owner.register(write_dof(tmp_path, f"big{i}", big_dof(i))).get("gen") == i
        latecomer = clients.start()  # started now: its interpreter start-up is not timed
        small = write_dof(tmp_path, "small", code_dof().data)
        writer_pid = handle.writer_pid()

        handle.proc.send_signal(signal.SIGUSR2)
        handle.wait_for(
            "the forced reparse to start", lambda: "forced reparse" in handle.log_text()
        )
        sock.setblocking(False)
        while True:  # forget the pings sent before the reparse started
            try:
                sock.recv(4096)
            except BlockingIOError:
                break
        answer = latecomer.register(small)
        assert answer.get("gen") == 0, answer

        # WATCHDOG=1 keeps coming while the reparse runs: count pings that were
        # received while the log still had no end-of-reparse line (so they were
        # sent before it was written).
        summary = "reparse (forced):"
        pings = 0
        sock.settimeout(0.5)
        while summary not in handle.log_text():
            try:
                message = sock.recv(4096).decode()
            except TimeoutError:
                continue
            finally:
                if handle.proc.poll() is not None:
                    pytest.fail(f"daemon exited:\n{handle.log_text()}")
            if "WATCHDOG=1" in message and summary not in handle.log_text():
                pings += 1
        assert pings >= 2, f"only {pings} WATCHDOG=1 during the reparse:\n{handle.log_text()}"

        lines = handle.log_text().splitlines()
        started = line_index(lines, "SIGUSR2: forced reparse")
        registered = line_index(lines, f"{latecomer.pid}: registered generation 0")
        finished = line_index(lines, summary)
        assert f"{summary} {MAPPINGS} mappings reparsed, 0 failed" in lines[finished]
        # The registration was answered (it logs after answering) before the
        # reparse ended, and before the last mapping's writer exchange was done.
        assert started < registered < finished, "\n".join(lines[started : finished + 1])
        last_mapping = line_index(lines, f"({MAPPINGS} of {MAPPINGS})")
        assert registered < last_mapping, "\n".join(lines[started : finished + 1])
        assert handle.writer_pid() == writer_pid
        handle.verify()
        assert os.path.isdir(handle.state_dir / "probes" / str(latecomer.pid))
    except BaseException:
        handle.cleanup_hard()
        raise
    finally:
        clients.close()
        sock.close()
    finish(handle)
