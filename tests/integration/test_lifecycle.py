"""Processes come and go: fork, exec, exit, SIGKILL, many at once, many threads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from tests.support.clients import Clients, code_dof, pid_alive, write_dof
from tests.support.daemon import DaemonHandle
from tests.support.stash_view import file_key, generations, probe_files

pytestmark = pytest.mark.timeout(120)


def test_sigkilled_client_is_pruned(daemon: DaemonHandle, clients: Clients, tmp_path: Path) -> None:
    dof = write_dof(tmp_path, "k", code_dof().data)
    client = clients.start()
    assert client.register(dof)["gen"] == 0
    assert client.pid in daemon.stash_pids()
    client.kill(signal.SIGKILL)
    daemon.wait_for(
        "the killed client's entries to go", lambda: client.pid not in daemon.stash_pids()
    )
    assert client.pid not in daemon.probe_pids()
    # logged once the writer answered, which may be just after the tree changed
    daemon.wait_for("the prune log line", lambda: f"{client.pid}: pruned" in daemon.log_text())
    daemon.verify()


def test_fork_child_registers_under_its_own_pid(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    dof = write_dof(tmp_path, "f", code_dof().data)
    parent = clients.start()
    assert parent.register(dof)["gen"] == 0
    answer = parent.send({"op": "fork_register", "dof_file": str(dof)})
    child = answer["child_pid"]
    assert answer["gen"] == 0  # generations are per process
    assert sorted(daemon.stash_pids()) == sorted([parent.pid, child])
    key = file_key(dof)
    assert generations(daemon.state_dir, child) == {0: key}
    assert sorted(probe_files(daemon.state_dir, child)) == sorted(
        probe_files(daemon.state_dir, parent.pid)
    )
    # both share the raw DOF (identical bytes, same mapping)
    assert (daemon.state_dir / "stash" / "dof" / key).stat().st_nlink == 3
    parent.send({"op": "end_children"})
    daemon.wait_for("the child's entries to go", lambda: daemon.stash_pids() == [parent.pid])
    daemon.verify()


def _exec_argv(python: str, client_argv: list[str], register: dict[str, object]) -> list[str]:
    # client_argv is [python, -m, tests.support.client, --device, D, --code-file, C]
    return [python, *client_argv[1:7], "--register", json.dumps(register)]


@pytest.mark.parametrize("target", ["same binary", "other binary"])
def test_exec_replaces_the_registrations(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path, target: str
) -> None:
    old = write_dof(tmp_path, "old", code_dof({"oldprov": [("main", "go")]}).data)
    new = write_dof(tmp_path, "new", code_dof({"newprov": [("main", "go")]}).data)
    client = clients.start()
    assert client.register(old)["gen"] == 0
    assert client.register(new)["gen"] == 1
    python = sys.executable
    if target == "other binary":
        python = str(tmp_path / "python-copy")
        shutil.copy2(os.path.realpath(sys.executable), python)  # another inode
    register = {"op": "register", "dof_file": str(new)}
    client.send({"op": "exec", "argv": _exec_argv(python, client.argv, register)}, answer=False)
    hello = client.read()
    assert hello["pid"] == client.pid
    # The same mapping (new.dof) registered again after the exec: had the exec gone
    # unnoticed this would be generation 2 with the old ones still there.
    assert hello["register"]["gen"] == 0, (target, hello)
    assert generations(daemon.state_dir, client.pid) == {0: file_key(new)}
    assert sorted(probe_files(daemon.state_dir, client.pid)) == ["newprov:fakeclient:main:go"]
    daemon.verify()


def test_many_threads_register_at_once(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    dof = write_dof(tmp_path, "t", code_dof().data)
    client = clients.start()
    answer = client.send({"op": "threads", "count": 32, "dof_file": str(dof)})
    gens = sorted(r["gen"] for r in answer["results"])
    assert gens == list(range(32))
    assert daemon.stash_pids() == [client.pid]  # every thread resolved to the process
    assert set(generations(daemon.state_dir, client.pid).values()) == {file_key(dof)}
    daemon.verify()


@pytest.mark.timeout(180)
def test_1024_clients_half_killed_leave_nothing_stale(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    dof = write_dof(tmp_path, "swarm", code_dof().data)
    parent = clients.start()
    answer = parent.send({"op": "swarm", "count": 1024, "dof_file": str(dof)})
    children = answer["children"]
    assert len(children) == 1024
    failed = [c for c in children if c.get("gen") != 0]
    assert not failed, (len(failed), failed[:3])
    pids = [c["pid"] for c in children]
    assert sorted(daemon.stash_pids()) == sorted(pids)
    for pid in pids[::2]:
        os.kill(pid, signal.SIGKILL)
    daemon.wait_for(
        "512 killed clients pruned", lambda: set(daemon.stash_pids()) == set(pids[1::2]), 60
    )
    parent.send({"op": "end_children"})
    daemon.wait_for("every client pruned", lambda: daemon.stash_pids() == [], 60)
    assert daemon.probe_pids() == []
    assert not any(pid_alive(p) for p in pids)
    assert list((daemon.state_dir / "stash" / "dof").iterdir()) == []
    daemon.verify()
