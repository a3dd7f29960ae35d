"""Row "errors say what happened": the log names the real cause, as the docs do.

Before, a quota refusal was logged as "I/O error" and running out of file
descriptors as "process dead?".  Now a quota refusal is EDQUOT with the limit it
hit, and fd exhaustion is EMFILE ("Too many open files").  The client gets EINVAL
either way, as upstream answers every failed registration; the daemon recovers as
soon as descriptors are free again.
"""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest

from tests.support.clients import Clients, code_dof, write_dof
from tests.support.daemon import DaemonFactory
from tests.support.stash_view import snapshot

pytestmark = pytest.mark.timeout(120)


def test_a_quota_refusal_is_edquot_in_the_log(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    daemon = daemon_factory.start(extra_args=["--max-probes-per-pid", "1"])
    clients = Clients(tmp_path, daemon.device)
    try:
        client = clients.start()
        before = snapshot(daemon.state_dir)
        answer = client.register(write_dof(tmp_path, "two", code_dof().data))  # two probes
        assert answer.get("errno") == errno.EINVAL, answer
        assert snapshot(daemon.state_dir) == before
        daemon.wait_for("the log line", lambda: "refused the registration" in daemon.log_text())
        (line,) = [ln for ln in daemon.log_text().splitlines() if "refused the registration" in ln]
        assert "stash quota refused the registration (EDQUOT)" in line, line
        assert "probes of this process would be 2, limit 1" in line, line
        assert "I/O error" not in line and "process dead" not in line, line
    finally:
        clients.close()


def test_fd_exhaustion_is_emfile_not_a_dead_process(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    daemon = daemon_factory.start()
    dof = write_dof(tmp_path, "ok", code_dof().data)
    clients = Clients(tmp_path, daemon.device)
    soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
    try:
        client = clients.start()
        assert client.register(dof)["gen"] == 0
        in_use = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        offset = len(daemon.log_text())
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (in_use, hard))
        answer = client.register(dof)
        assert answer.get("errno") == errno.EINVAL, answer
        daemon.wait_for("the log line", lambda: "Too many open files" in daemon.log_text()[offset:])
        lines = daemon.log_text()[offset:]
        assert "process dead" not in lines, lines
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert client.register(dof)["gen"] == 1  # descriptors free again: served again
        assert daemon.proc.poll() is None
        daemon.verify()
    finally:
        if daemon.proc.poll() is None:
            resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (soft, hard))
        clients.close()
