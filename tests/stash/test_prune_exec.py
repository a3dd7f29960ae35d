"""Pruning catches exec(), not only exit.

An exec keeps the pid and the start time, so a process that execs into an
image with no DOF would keep its old probes until it exits (upstream's gap,
reference §4.6). prune_dead compares the stored exec token (AT_RANDOM's
address, which moves on every exec under ASLR) with the live process's.

Several processes: one execs another binary, one execs the *same* binary
(seen only through the token), one does not exec at all and must stay.  With
ASLR off the token repeats (a documented limit): the test then fails with a
message saying so instead of skipping — CI runs with ASLR on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtprobed.oslib.procfs import current_exec_token
from dtprobed.oslib.procfs import start_time_of as proc_start_time
from dtprobed.stash.store import Stash
from tests.stash.support import WORKED, exec_finished, registration

ASLR_KNOB = Path("/proc/sys/kernel/randomize_va_space")
ADDR_NO_RANDOMIZE = 0x0040000  # <linux/personality.h>


def _waiter(target: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """A Python process that waits for a line, then execs *target*: same pid, same start time."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, sys; sys.stdin.readline(); os.execv({target!r}, {argv!r})",
        ],
        stdin=subprocess.PIPE,
    )


@pytest.mark.timeout(60)
def test_prune_dead_removes_processes_that_execed(tmp_path: Path) -> None:
    personality = int(Path("/proc/self/personality").read_text(), 16)
    if personality & ADDR_NO_RANDOMIZE:
        pytest.fail(
            "ASLR is off for this process (personality ADDR_NO_RANDOMIZE, e.g. setarch -R): "
            "an exec of the same binary keeps AT_RANDOM's address, so the exec token cannot "
            "see it (documented limit). Run this test with ASLR on."
        )
    if ASLR_KNOB.read_text().strip() == "0":
        pytest.fail(
            f"ASLR is off on this host ({ASLR_KNOB} is 0): an exec of the same binary keeps "
            "AT_RANDOM's address, so the exec token cannot see it (documented limit). "
            "Run this test with ASLR on (echo 2 > /proc/sys/kernel/randomize_va_space)."
        )
    sleep = shutil.which("sleep")
    assert sleep is not None
    python = os.path.realpath(sys.executable)
    stays = [python, "-c", "import sys; sys.stdin.readline(); import time; time.sleep(30)"]
    procs = {
        "other binary": _waiter(sleep, ["sleep", "30"]),
        "same binary": _waiter(python, stays),
        "no exec": subprocess.Popen(stays, stdin=subprocess.PIPE),
    }
    try:
        starts: dict[str, int] = {}
        tokens: dict[str, str | None] = {}
        for what, proc in procs.items():
            deadline = time.monotonic() + 10
            while not exec_finished(proc.pid, os.path.basename(python)):
                assert time.monotonic() < deadline, f"{what}: the interpreter never started"
                time.sleep(0.001)
            start = proc_start_time(proc.pid)
            assert start is not None
            starts[what] = start
            tokens[what] = current_exec_token(proc.pid)
        stash = Stash(str(tmp_path))
        for what, proc in procs.items():
            stash.register(registration(proc.pid, starts[what]), WORKED)
        assert stash.prune_dead() == []  # alive, same images

        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        for what in ("other binary", "same binary"):
            pid = procs[what].pid
            deadline = time.monotonic() + 10
            while current_exec_token(pid) == tokens[what]:
                assert time.monotonic() < deadline, f"{what}: the process did not exec"
                time.sleep(0.01)
            want = os.path.realpath(sleep) if what == "other binary" else python
            deadline = time.monotonic() + 10
            while not (os.readlink(f"/proc/{pid}/exe") == want and current_exec_token(pid)):
                assert time.monotonic() < deadline, f"{what}: exec did not finish"
                time.sleep(0.01)
            assert proc_start_time(pid) == starts[what]  # exec keeps the start time
        assert current_exec_token(procs["no exec"].pid) == tokens["no exec"]

        execed = sorted(procs[w].pid for w in ("other binary", "same binary"))
        assert sorted(stash.prune_dead()) == execed
        assert os.listdir(tmp_path / "stash/dof-pid") == [str(procs["no exec"].pid)]
        assert stash.verify() == []
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
