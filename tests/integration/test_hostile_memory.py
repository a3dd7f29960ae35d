"""Rows "6 concurrent valid 256 MiB DOF" and "610 probes × 255 argument types": memory.

Before: the shared 1 GiB queue bound refused tiny requests too (58 of 106 canaries)
and peak RSS reached 3.2 GB; after the argument bomb the daemon stayed at 224 MB and
the writer at 257 MB.  Now DOF bytes queued or in flight are budgeted per lane and
per uid (the small lane has a budget of its own), and both processes give back what
a hostile request made them allocate.

The flood runs scaled down by option (``--max-queued-bytes`` 3 MiB, per uid 2 MiB,
~0.9 MiB DOF instead of 256 MiB ones), so its proportions are the full-size ones:
a uid's share holds two of its DOF at once, and the lane's total leaves room for
another uid's.  Full size, with latencies: ``bench/bench_attack.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from tests.integration.test_hostile_stash import (
    HOSTILE_UID,
    ForeignClients,
    _shared_argument_runs,
    probes_dof,
)
from tests.support.client import CODE_ADDR
from tests.support.clients import Clients, code_dof, dof_bytes, write_dof
from tests.support.daemon import DaemonFactory, DaemonHandle, status_kib

pytestmark = pytest.mark.timeout(300)

MIB = 1 << 20
QUEUED_TOTAL, QUEUED_PER_UID = 3 * MIB, 2 * MIB
#: Peak RSS above rest allowed during the flood (docs/security.md): the bytes the
#: large lane may hold, twice (the fetched buffer and the parser's frame of it), plus
#: the records of the DOF being parsed and committed and the interpreter's slack.
PEAK_SLACK = 96 * MIB


def test_six_concurrent_large_dof_are_refused_only_to_their_sender(
    daemon_factory: DaemonFactory, shared: Path, shm: Path
) -> None:
    daemon = daemon_factory.start(
        device=shared / "helper",
        state_dir=shm,
        extra_args=[
            *("--max-queued-bytes", str(QUEUED_TOTAL)),
            *("--max-queued-bytes-per-uid", str(QUEUED_PER_UID)),
        ],
    )
    big = write_dof(shared, "big", probes_dof(15000, "flood"))
    size = len(dof_bytes(big))
    assert QUEUED_PER_UID // 3 < size <= QUEUED_PER_UID // 2, size  # two fit in a share
    mine = write_dof(shared, "mine", probes_dof(15000, "mine"))  # root's own large one
    small = write_dof(shared, "small", code_dof().data)
    foreign = ForeignClients(shared, daemon.device)
    clients = Clients(shared, daemon.device)
    try:
        canary, large_canary = clients.start(), clients.start()
        assert canary.register(small)["gen"] == 0
        rest = status_kib(daemon.pid, "VmRSS") << 10
        flooder = foreign.start()
        answers: list[dict[str, Any]] = []
        flood: list[dict[str, Any]] = []
        for _ in range(2):
            flooder.send({"op": "swarm", "count": 6, "dof_file": str(big)}, answer=False)
            answers.append(large_canary.register(mine))
            for _ in range(20):  # tiny requests meanwhile: the small lane's own budget
                answers.append(canary.register(small))
            flood += flooder.read(timeout=120)["children"]
            assert flooder.send({"op": "end_children"}) == {"ended": True}
        peak = status_kib(daemon.pid, "VmHWM") << 10
        assert [a for a in answers if "gen" not in a] == []  # root: never refused
        assert len(flood) == 12
        refused = [c for c in flood if "gen" not in c]
        assert refused and len(refused) < len(flood), flood  # its share used, then refused
        log = daemon.log_text()
        assert f"uid {HOSTILE_UID} already has" in log, log[-3000:]
        assert "uid 0 already has" not in log and "already in the large lane" not in log
        print(f"flood: rest {rest >> 10} KiB, peak {peak >> 10} KiB")
        assert peak - rest < 2 * QUEUED_TOTAL + PEAK_SLACK, (rest, peak)
        assert daemon.proc.poll() is None
        assert {canary.pid, large_canary.pid} <= set(daemon.stash_pids())
        daemon.verify()
    finally:
        clients.close()
        foreign.close()


def _argument_bomb() -> bytes:
    """A 65 KB DOF whose records decode to ~20 MB (610 probes × 255 types of 127 bytes)."""
    types: list[str | bytes] = [f"t{j:03d}" + "x" * 123 for j in range(255)]
    with _shared_argument_runs():
        probes = [
            ProbeSpec(f"f{i}", f"p{i}", [0x10], addr=CODE_ADDR + 0x100, native=types)
            for i in range(610)
        ]
        return build_dof([ProviderSpec("mem", probes)]).data


def _settled_rss_kib(daemon: DaemonHandle) -> tuple[int, int]:
    return status_kib(daemon.pid, "VmRSS"), status_kib(daemon.writer_pid(), "VmRSS")


def test_daemon_and_writer_return_to_rest_after_the_argument_bomb(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    bomb = _argument_bomb()
    assert len(bomb) < 80_000
    daemon = daemon_factory.start()
    small = write_dof(tmp_path, "small", code_dof().data)
    hostile_dof = write_dof(tmp_path, "bomb", bomb)
    clients = Clients(tmp_path, daemon.device)
    try:
        victim = clients.start()
        assert victim.register(small)["gen"] == 0
        writer = daemon.writer_pid()
        rest_daemon, rest_writer = _settled_rss_kib(daemon)
        for round_ in range(2):  # twice: nothing accumulates either
            hostile = clients.start()
            assert hostile.register(hostile_dof)["gen"] == 0
            assert hostile.exit() == 0
            daemon.wait_for(
                "the hostile process pruned", lambda h=hostile: h.pid not in daemon.stash_pids()
            )
            # a registration after it: both have finished their clean-up
            assert victim.register(small)["gen"] == round_ + 1
        assert daemon.writer_pid() == writer
        after_daemon, after_writer = _settled_rss_kib(daemon)
        peak_daemon = status_kib(daemon.pid, "VmHWM")
        # measured: daemon +3.3 MiB (peak +69 MiB), writer +2.1 to +3.5 MiB
        assert after_writer - rest_writer <= 6144, (rest_writer, after_writer)
        assert after_daemon - rest_daemon <= 8192, (rest_daemon, after_daemon, peak_daemon)
        daemon.verify()
    finally:
        clients.close()
