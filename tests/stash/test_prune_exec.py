"""Pruning catches exec(), not only exit.

An exec keeps the pid and the start time, so a process that execs into an
image with no DOF would keep its old probes until it exits (upstream's gap,
reference §4.6). prune_dead compares the stored exec token (AT_RANDOM's
address, which moves on every exec under ASLR) with the live process's.
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

# Run only where exec moves AT_RANDOM: with ASLR off the token repeats (documented limit).
ASLR = Path("/proc/sys/kernel/randomize_va_space").read_text().strip() != "0"


@pytest.mark.timeout(30)
@pytest.mark.skipif(not ASLR, reason="ASLR is off on this host: exec tokens repeat")
def test_prune_dead_removes_a_process_that_execed(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    # waits for a line, then execs sleep: same pid, same start time, new image
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, sys; sys.stdin.readline(); os.execv({sleep!r}, ['sleep', '30'])",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        python = os.path.basename(os.path.realpath(sys.executable))
        while not exec_finished(proc.pid, python):
            assert time.monotonic() < deadline, "the interpreter never started"
            time.sleep(0.001)
        start = proc_start_time(proc.pid)
        assert start is not None
        stash = Stash(str(tmp_path))
        stash.register(registration(proc.pid, start), WORKED)
        assert stash.prune_dead() == []  # alive, same image

        before = current_exec_token(proc.pid)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{proc.pid}/exe") != os.path.realpath(sleep):
            assert time.monotonic() < deadline, "the process did not exec"
            time.sleep(0.01)
        assert proc_start_time(proc.pid) == start  # exec keeps the start time
        assert current_exec_token(proc.pid) != before

        assert stash.prune_dead() == [proc.pid]
        assert os.listdir(tmp_path / "stash/dof-pid") == []
        assert stash.verify() == []
    finally:
        proc.kill()
        proc.wait()
