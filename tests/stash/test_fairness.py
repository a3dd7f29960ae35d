"""Quotas per process, per uid and in total (probes and raw bytes); progress, not deadlines.

The writer-side half of "no local user can stop, stall or starve the daemon"
(docs/security.md): a user can fill only its own share, a long commit or a
long start-up is not a broken writer, and a command that breaks the writer
fails alone — it neither backs the writer off nor counts as the writer failing.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path

import msgspec
import pytest

from common.errors import ChildFailed, StashError
from common.records import ResultRecord
from common.stash_protocol import UNKNOWN_UID, Registration, StashQuotas
from dtprobed.children.writer import StashWriterChild, WriterCommandFailed
from dtprobed.stash.layout import XATTR_UID
from dtprobed.stash.store import Progress, Stash
from tests.stash.support import many_records, records_for, registration, sleepers, snapshot

#: pids far above any real one (PID_MAX_LIMIT is 2^22): never alive, never pruned here
FAKE = 4_000_000


def _reg(pid: int, *, uid: int, ino: int = 99, dof: bytes | None = None) -> Registration:
    reg = registration(pid, 1, ino=ino, token="tok1", dof=dof)
    return msgspec.structs.replace(reg, uid=uid)


def _probes(n: int, tag: str) -> list[ResultRecord]:
    return records_for(tag, [("m", "f", f"p{i}", 0x1000 + 16 * i) for i in range(n)])


# ------------------------------------------------------------------ probes per uid


def test_probes_per_uid_quota_refuses_only_that_user(tmp_path: Path) -> None:
    q = StashQuotas(max_probes_per_pid=10, max_probes_per_uid=15, max_probes_total=100)
    stash = Stash(str(tmp_path), q)
    try:
        assert stash.register(_reg(FAKE + 1, uid=1000), _probes(10, "a")) == 0
        before = snapshot(str(tmp_path))
        with pytest.raises(StashError) as err:
            stash.register(_reg(FAKE + 2, uid=1000), _probes(10, "b"))
        assert err.value.errno == errno.EDQUOT
        assert "probes of uid 1000 would be 20, limit 15" in str(err.value)
        assert snapshot(str(tmp_path)) == before  # a refusal writes nothing
        assert stash.register(_reg(FAKE + 2, uid=1000), _probes(5, "b")) == 0  # its share
        assert stash.register(_reg(FAKE + 3, uid=1001), _probes(10, "c")) == 0  # another user
        assert stash.verify() == []
    finally:
        stash.close()


def test_per_uid_counts_are_rebuilt_from_the_uid_xattr(tmp_path: Path) -> None:
    q = StashQuotas(max_probes_per_pid=10, max_probes_per_uid=15, max_probes_total=100)
    stash = Stash(str(tmp_path), q)
    stash.register(_reg(FAKE + 1, uid=1000), _probes(10, "a"))
    stash.close()
    pdir = tmp_path / "stash" / "dof-pid" / str(FAKE + 1)
    assert os.getxattr(pdir, XATTR_UID) == b"1000"
    stash = Stash(str(tmp_path), q)  # a restarted writer: counts from the tree
    try:
        with pytest.raises(StashError) as err:
            stash.register(_reg(FAKE + 2, uid=1000), _probes(6, "b"))
        assert err.value.errno == errno.EDQUOT
        assert stash.register(_reg(FAKE + 2, uid=1000), _probes(5, "b")) == 0
        # removal gives the share back
        stash.remove_pid(FAKE + 1)
        assert stash.register(_reg(FAKE + 3, uid=1000), _probes(10, "c")) == 0
    finally:
        stash.close()


def test_a_process_without_uid_xattr_is_charged_to_unknown(tmp_path: Path) -> None:
    """An upstream daemon's dof-pid/$pid has no xattr: charged to UNKNOWN_UID, not to root."""
    q = StashQuotas(max_probes_per_pid=10, max_probes_per_uid=12, max_probes_total=100)
    stash = Stash(str(tmp_path), q)
    stash.register(_reg(FAKE + 1, uid=0), _probes(10, "a"))
    stash.close()
    os.removexattr(tmp_path / "stash" / "dof-pid" / str(FAKE + 1), XATTR_UID)
    stash = Stash(str(tmp_path), q)
    try:
        assert stash.usage.uid_probes == {UNKNOWN_UID: 10}
        assert stash.register(_reg(FAKE + 2, uid=0), _probes(10, "b")) == 0  # root: all 12
    finally:
        stash.close()


# ------------------------------------------------------------------ raw bytes


def test_raw_bytes_quotas_per_process_per_uid_and_total(tmp_path: Path) -> None:
    dof = b"\x7fDOF" + bytes(996)  # 1000 bytes (the writer never parses it)
    q = StashQuotas(
        max_raw_bytes_per_pid=2500, max_raw_bytes_per_uid=3500, max_raw_bytes_total=5500
    )
    stash = Stash(str(tmp_path), q)
    try:
        for ino in (1, 2):
            stash.register(_reg(FAKE + 1, uid=7, ino=ino, dof=dof), _probes(1, f"a{ino}"))
        # the same mapping again: a new generation, no new raw bytes
        assert stash.register(_reg(FAKE + 1, uid=7, ino=2, dof=dof), _probes(1, "a2")) == 2
        before = snapshot(str(tmp_path))
        for pid, uid, ino, what in (
            (FAKE + 1, 7, 3, "raw bytes of this process would be 3000, limit 2500"),
            (FAKE + 2, 7, 4, None),  # 3000 of the user's 3500
            (FAKE + 2, 7, 5, "raw bytes of uid 7 would be 4000, limit 3500"),
            (FAKE + 3, 8, 6, None),
            (FAKE + 3, 8, 7, None),  # 5000 in all
            (FAKE + 4, 9, 8, "raw bytes in the stash would be 6000, limit 5500"),
        ):
            reg = _reg(pid, uid=uid, ino=ino, dof=dof)
            if what is None:
                stash.register(reg, _probes(1, f"x{ino}"))
                before = snapshot(str(tmp_path))
                continue
            with pytest.raises(StashError) as err:
                stash.register(reg, _probes(1, f"x{ino}"))
            assert err.value.errno == errno.EDQUOT and what in str(err.value), err.value
            assert snapshot(str(tmp_path)) == before
        assert stash.usage.raw == 5000
    finally:
        stash.close()
    stash = Stash(str(tmp_path), q)  # rebuilt from the raw files' sizes
    try:
        assert stash.usage.raw == 5000 and stash.usage.uid_raw == {7: 3000, 8: 2000}
    finally:
        stash.close()


# ------------------------------------------------------ progress instead of deadlines


def test_a_commit_longer_than_the_timeout_succeeds(shm: Path) -> None:
    """65536 probes take over a second to commit; -t 0.5 bounds only the writer's silence."""
    frames: list[int] = []
    with sleepers(1) as (p,):
        writer = StashWriterChild(str(shm), timeout=0.5, on_progress=lambda: frames.append(1))
        try:
            reg = registration(p.pid, p.start_time)
            assert writer.register_records(reg, many_records(65536)) == 0
            assert len(frames) >= 2  # Progress frames kept the silence window open
            writer.remove_pid(p.pid)  # as long, as fine
            assert writer.verify() == []
        finally:
            writer.stop()


def test_start_up_recovery_longer_than_the_timeout(shm: Path) -> None:
    """A crash left 2 × 32768 probes, one process's probes/ links gone: recovery relinks
    them and rebuilds the index, reporting progress; -t 0.3 does not cut it off."""
    with sleepers(2) as procs:
        stash = Stash(str(shm))
        for p in procs:
            stash.register(registration(p.pid, p.start_time), many_records(32768, f"s{p.pid}"))
        stash.close()
        shutil.rmtree(shm / "probes" / str(procs[0].pid))
        writer = StashWriterChild(str(shm), timeout=0.3)
        try:
            writer.start()
            assert writer.started is not None and writer.started.probes == 65536
            assert writer.prune_dead() == []
            assert writer.verify() == []
        finally:
            writer.stop()


def test_failed_commands_fail_alone_and_never_back_off(shm: Path) -> None:
    """Six commands in a row whose writer goes silent: each fails by itself with
    WriterCommandFailed (ETIMEDOUT), never ChildFailed, and the seventh works at once
    (no back-off: the role is not broken, one request was)."""
    writer = StashWriterChild(str(shm), timeout=0.3)
    try:
        for _ in range(6):
            writer.start()
            assert writer.pid is not None
            os.kill(writer.pid, signal.SIGSTOP)
            with pytest.raises(WriterCommandFailed) as err:
                writer.remove_pid(FAKE)
            assert err.value.errno == errno.ETIMEDOUT
            assert not isinstance(err.value, ChildFailed)
        writer.remove_pid(FAKE)
        assert writer.verify() == []
    finally:
        writer.stop()


def test_a_writer_that_cannot_start_is_a_child_failure(tmp_path: Path) -> None:
    """Start failures stay ChildFailed (the daemon gives up after several in a row)."""
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    writer = StashWriterChild(str(blocker), timeout=5)
    with pytest.raises(ChildFailed):
        writer.start()
    with pytest.raises(ChildFailed):
        writer.prune_dead()


def test_default_shares_leave_room_for_other_users() -> None:
    """With the defaults no one user (nor one process) can fill the stash: each share
    is at most a quarter of its total, and a process fits in its user's share."""
    q = StashQuotas()
    assert 4 * q.max_probes_per_uid <= q.max_probes_total
    assert 4 * q.max_raw_bytes_per_uid <= q.max_raw_bytes_total
    assert q.max_probes_per_pid <= q.max_probes_per_uid
    assert q.max_raw_bytes_per_pid <= q.max_raw_bytes_per_uid
    # install.sh's tmpfs reserves 256 MiB for raw blocks (docs/operations.md)
    assert q.max_raw_bytes_total <= 256 << 20


def test_no_progress_frame_of_a_phase_comes_after_it() -> None:
    """The helper thread's Progress frames of a bounded phase all precede what the main
    thread writes after the phase (its reply): else the daemon would see a Progress
    frame between two commands, a protocol violation."""
    events: list[str] = []

    def report(done: int, what: str) -> None:
        time.sleep(0.0002)  # a pipe write: the GIL is released meanwhile
        events.append("p")

    meter = Progress(report, interval=1e-6)
    for _ in range(300):
        events.append("b")
        with meter.bounded("phase"):
            time.sleep(0.0005)  # the grammar check, say
        events.append("r")  # the reply
        time.sleep(0.0005)  # waiting for the next command
    after_reply = False
    for e in events:
        if e == "r":
            after_reply = True
        elif e == "b":
            after_reply = False
        else:
            assert not after_reply, "a Progress frame of a finished phase"
    assert events.count("p") > 0
