"""A registration's cost in file descriptors does not grow with the DOF.

Every probe may name its own function, so a writer that kept one directory fd
per ``probes/…/$fun`` ran out of descriptors on a 20000-probe DOF.
"""

from __future__ import annotations

import os
import resource
import sys

import pytest

from common.grammar import check_stream
from dtprobed.oslib.procfs import start_time_of as proc_start_time
from dtprobed.stash.store import Stash
from dtprobed.stash.verify import verify_tree
from tests.stash.support import records_for, registration

NPROBES = 2000
#: fds a registration may use beyond those already open (the forked pytest's, the
#: writer's own: state directory fds, lock, undo reserve): far below NPROBES
FD_HEADROOM = 40


@pytest.mark.timeout(60)
def test_one_function_per_probe_under_a_small_fd_limit(tmp_path: os.PathLike[str]) -> None:
    records = records_for(
        "scale", [("a.out", f"fn{i}", f"p{i}", 0x401000 + 16 * i) for i in range(NPROBES)]
    )
    assert len(check_stream(records).probes) == NPROBES
    state = os.path.join(tmp_path, "run")
    child = os.fork()
    if child == 0:  # the limit must not leak into pytest itself
        code = 1
        try:
            me = os.getpid()
            stash = Stash(state)
            limit = max(int(n) for n in os.listdir("/proc/self/fd")) + 1 + FD_HEADROOM
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            stash.register(registration(me, proc_start_time(me) or 0), records)
            code = 0
        except BaseException as err:
            print(f"register failed: {err!r}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert verify_tree(fd) == []
    finally:
        os.close(fd)
    pid_probes = os.path.join(state, "probes", str(child), f"scale{child}", "a.out")
    assert len(os.listdir(pid_probes)) == NPROBES
