"""Row "tracepoints at libc's text": tracepoints only in the registering object.

Before, any executable file-backed mapping passed, so a process could make root's
dtrace place uprobes in libc's inode (which every process maps); executable
``/dev/zero (deleted)`` and memfd mappings passed as "file-backed" too.  Now:

* DOF in a file mapping: every tracepoint in an executable mapping of that file;
* DOF in anonymous memory (libusdt): every tracepoint in an executable private
  mapping of an unlinked regular file or a memfd, as read through
  ``/proc/PID/map_files`` (not from the maps line's text, which a name can fake).

Each shape is a real client against a private daemon: accepted ones are stashed,
refused ones get EINVAL and leave the state directory byte-identical.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from tests.support.clients import Clients, code_dof, write_dof, write_plain_dof
from tests.support.daemon import DaemonHandle
from tests.support.stash_view import file_key, generations, probe_files, snapshot

pytestmark = pytest.mark.timeout(120)


def _aimed_at(addr: int) -> bytes:
    return build_dof([ProviderSpec("evil", [ProbeSpec("f", "p", [0x10], addr=addr)])]).data


def test_accepted_shapes(daemon: DaemonHandle, clients: Clients, tmp_path: Path) -> None:
    """The object's own text; anonymous DOF with its code in a memfd or an unlinked file."""
    obj = write_dof(tmp_path, "own", code_dof().data)
    first, second = clients.start(), clients.start()
    assert first.register(obj)["gen"] == 0
    assert second.register(obj)["gen"] == 0
    key = file_key(obj)
    assert generations(daemon.state_dir, first.pid) == {0: key}
    assert generations(daemon.state_dir, second.pid) == {0: key}
    assert (daemon.state_dir / "stash" / "dof" / key).is_file()  # shared, one raw copy
    for gen, how in enumerate(["memfd", "unlinked"], start=1):
        answer = first.register(obj, anon=True, anon_text=how)
        assert answer.get("gen") == gen, (how, answer)
        assert generations(daemon.state_dir, first.pid)[gen] == f"0-{answer['dof_addr']}"
    assert len(probe_files(daemon.state_dir, first.pid)) == 2
    assert not list(tmp_path.glob("text.*.tmp"))  # the "unlinked" text file is gone
    daemon.verify()


def test_refused_shapes_leave_nothing(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    client = clients.start()
    libc = client.hello["libc_text"]
    assert libc > 0, client.hello
    good = code_dof().data  # tracepoints at CODE_ADDR + 0x110 and up
    before = snapshot(daemon.state_dir)
    cases: list[tuple[str, Path, dict[str, Any], str]] = [
        # DOF in a file, tracepoints in libc's text
        ("file DOF, libc", write_dof(tmp_path, "libc", _aimed_at(libc + 0x10)), {}, "registering"),
        # DOF in a file, tracepoints in another file's text (the named code.bin)
        ("file DOF, other file", write_dof(tmp_path, "other", good), {"text": "code-file"}, "registering"),
        ("plain DOF file", write_plain_dof(tmp_path, "plain", good), {}, "registering"),
        # DOF in anonymous memory
        ("anon, libc", write_dof(tmp_path, "alibc", _aimed_at(libc + 0x10)), {"anon": True}, "named"),
        ("anon, named", write_dof(tmp_path, "named", good), {"anon": True, "anon_text": "code-file"}, "named"),
        ("anon, shared", write_dof(tmp_path, "shared", good), {"anon": True, "anon_text": "shared"}, "shared"),
        ("anon, /dev/zero", write_dof(tmp_path, "zero", good), {"anon": True, "anon_text": "zero"}, "regular"),
        (
            "anon, a file named 'text (deleted)'",
            write_dof(tmp_path, "fake-deleted", good),
            {"anon": True, "anon_text": "named-deleted"},
            "named",
        ),
    ]  # fmt: skip
    for what, path, extra, why in cases:
        offset = len(daemon.log_text())
        answer = client.register(path, **extra)
        assert answer.get("errno") == errno.EINVAL, (what, answer)
        daemon.wait_for(what, lambda at=offset: "tracepoint" in daemon.log_text()[at:])
        line = daemon.log_text()[offset:]
        assert why in line, (what, line)
        assert snapshot(daemon.state_dir) == before, what
    assert (tmp_path / "text (deleted)").exists()  # the fake really has that name
    # The same client, legitimately, afterwards: nothing was held against it.
    assert client.register(write_dof(tmp_path, "fine", good))["gen"] == 0
    daemon.verify()
