"""What the writer answers when a registration fails: the real errno and a precise message.

Real conditions, no mocks: a quota of the writer, a writer process whose
RLIMIT_NOFILE is lowered under it (prlimit), and a state directory on a tmpfs
mounted with a few inodes.  Each failure leaves the tree as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import StashError
from common.grammar import ParsedProbe, check_stream
from common.stash_protocol import StashQuotas
from dtprobed.children.writer import StashWriterChild
from tests.stash.support import many_records, records_for, registration, sleepers, snapshot

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _probes(n: int, provider: str = "p") -> list[ParsedProbe]:
    return check_stream(many_records(n, provider), max_probes=None).probes


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 40 inodes: a registration of many functions runs out of them."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=40,mode=0755", "tmpfs", str(mnt)],
        check=True,
    )
    try:
        yield mnt
    finally:
        _libc.umount2(os.fsencode(str(mnt)), 2)  # MNT_DETACH


@pytest.mark.timeout(60)
def test_quota_refusal_is_edquot_naming_the_quota(tmp_path: Path) -> None:
    writer = StashWriterChild(
        str(tmp_path / "run"), timeout=30, quotas=StashQuotas(max_probes_per_pid=5)
    )
    with sleepers(1) as (p,):
        try:
            writer.register(registration(p.pid, p.start_time, ino=1), _probes(3))
            before = snapshot(str(tmp_path / "run"))
            with pytest.raises(StashError) as info:
                writer.register(registration(p.pid, p.start_time, ino=2), _probes(3, "q"))
            assert info.value.errno == errno.EDQUOT
            message = str(info.value)
            assert "quota exceeded: probes of this process would be 6, limit 5" in message
            assert "I/O error" not in message
            assert snapshot(str(tmp_path / "run")) == before
        finally:
            writer.stop()


@pytest.mark.timeout(60)
def test_fd_exhaustion_is_emfile_not_process_dead(tmp_path: Path) -> None:
    state = tmp_path / "run"
    writer = StashWriterChild(str(state), timeout=30)
    with sleepers(1) as (p,):
        try:
            writer.register(registration(p.pid, p.start_time, ino=1), _probes(1))
            before = snapshot(str(state))
            pid = writer.pid
            assert pid is not None
            in_use = len(os.listdir(f"/proc/{pid}/fd"))
            soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            # room for the pid directory and one more: the mapping's fds run out
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 2, hard))
            with pytest.raises(StashError) as info:
                writer.register(registration(p.pid, p.start_time, ino=2), _probes(300))
            assert info.value.errno == errno.EMFILE, info.value
            message = str(info.value)
            assert "Too many open files" in message and "[EMFILE]" in message, message
            assert "process dead" not in message and "I/O error" not in message
            assert writer.pid == pid  # a failed command, not a broken writer
            assert snapshot(str(state)) == before
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            assert writer.register(registration(p.pid, p.start_time, ino=2), _probes(300)) == 1
        finally:
            writer.stop()


@pytest.mark.timeout(60)
def test_out_of_inodes_is_enospc_with_the_file(small_tmpfs: Path) -> None:
    state = small_tmpfs / "run"
    writer = StashWriterChild(str(state), timeout=30)
    with sleepers(1) as (p,):
        try:
            records = records_for("prv", [("m", f"f{i}", "p", 0x10 * i) for i in range(40)])
            probes = check_stream(records, max_probes=None).probes
            with pytest.raises(StashError) as info:
                writer.register(registration(p.pid, p.start_time, ino=2), probes)
            assert info.value.errno == errno.ENOSPC, info.value
            assert "No space left on device" in str(info.value), info.value
            assert os.listdir(state / "stash/dof-pid") == []
            assert os.listdir(state / "probes") == []
            assert os.listdir(state / "stash/dof") == []
            assert writer.verify() == []
        finally:
            writer.stop()
