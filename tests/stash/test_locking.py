"""No unprivileged process can block the writer; two writers never share a state directory.

Readers take no lock (design.md, "dtprobed-stash"); the writers' exclusion is
a lock file in a 0700 directory (docs/stash.md, "Writing, crash safety and
recovery").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import StashError
from dtprobed.children.writer import StashWriterChild
from dtprobed.cli.stash import main as stash_cli
from dtprobed.oslib.dirfd import DirFd
from dtprobed.stash.store import Stash
from dtprobed.stash.verify import verify_settled
from tests.stash.support import Proc, many_records, records_for, registration, sleepers

NOBODY = 65534


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is 0700)."""
    d = tempfile.mkdtemp(prefix="dtprobed-lock-")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        import shutil

        shutil.rmtree(d)


def _hold_shared_locks(state: Path, ready_w: int) -> None:  # pragma: no cover - child
    """As uid 65534: LOCK_SH on the state directory and everything it can open, then wait."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    assert os.geteuid() == NOBODY
    held = []
    count = 0
    for dirpath, dirnames, filenames in os.walk(state):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
                fcntl.flock(fd, fcntl.LOCK_SH)
                held.append(fd)
                count += 1
    # the writers' lock directory is closed to us
    try:
        os.open("/run/dtprobed", os.O_RDONLY)
        count = -1
    except PermissionError:
        pass
    os.write(ready_w, str(count).encode())
    signal.pause()


@pytest.mark.timeout(120)
def test_unprivileged_shared_locks_do_not_stop_the_writer(open_tmp: Path) -> None:
    state = open_tmp / "run"
    writer = StashWriterChild(str(state), timeout=30)
    with sleepers(1) as (p,):
        try:
            assert writer.register(registration(p.pid, p.start_time, ino=1), _probes(1)) == 0
            ready_r, ready_w = os.pipe()
            holder = os.fork()
            if holder == 0:  # pragma: no cover
                try:
                    os.close(ready_r)
                    _hold_shared_locks(state, ready_w)
                finally:
                    os._exit(1)
            os.close(ready_w)
            try:
                held = int(os.read(ready_r, 32) or b"-2")
                assert held > 10, f"the unprivileged holder locked only {held} entries"
                # the lock holder is alive and holding: every registration still goes through
                for i in range(2, 8):
                    reg = registration(p.pid, p.start_time, ino=i)
                    assert writer.register(reg, _probes(i)) == i - 1
                writer.remove(p.pid, 0)
                assert writer.verify() == []
                writer.stop()
                # the same in this process (the code under test even without an install)
                stash = Stash(str(state))
                assert (
                    stash.register_probes(registration(p.pid, p.start_time, ino=8), _probes(8)) == 7
                )
                stash.close()
                # a new writer (restart) starts too: recovery and all
                assert writer.register(registration(p.pid, p.start_time, ino=9), _probes(9)) == 8
                assert os.waitpid(holder, os.WNOHANG) == (0, 0), "the holder gave up"
            finally:
                os.kill(holder, signal.SIGKILL)
                os.waitpid(holder, 0)
                os.close(ready_r)
        finally:
            writer.stop()


def _probes(i: int) -> list:  # type: ignore[type-arg]
    from common.grammar import check_stream

    return check_stream(records_for(f"p{i}", [("m", "f", "a", 0x10)]), max_probes=None).probes


def test_a_second_writer_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    state = str(tmp_path / "run")
    first = Stash(state)
    with pytest.raises(StashError) as info:
        Stash(state, lock_wait=0)
    assert info.value.errno == errno.EBUSY
    assert f"in use by another stash writer (pid {os.getpid()}" in str(info.value)
    st = os.stat(state)
    lock_file = Path(f"/run/dtprobed/stash-{st.st_dev}-{st.st_ino}.lock")
    assert lock_file.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
    first.close()
    assert not lock_file.exists()  # a writer that closes leaves no file behind
    Stash(state, lock_wait=0).close()  # released with the first


def test_lock_directory_must_be_private(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o755)
    os.chmod(lock_dir, 0o755)
    with pytest.raises(StashError) as info:
        Stash(str(tmp_path / "run"), lock_dir=str(lock_dir))
    assert info.value.errno == errno.EPERM and "must be 0700" in str(info.value)
    os.chmod(lock_dir, 0o700)
    Stash(str(tmp_path / "run"), lock_dir=str(lock_dir)).close()
    (link := tmp_path / "link").symlink_to(lock_dir)
    with pytest.raises(OSError) as err:
        Stash(str(tmp_path / "run2"), lock_dir=str(link))
    assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)  # refused, not followed
    assert stat.S_IMODE(os.stat("/run/dtprobed").st_mode) == 0o700


def _churn(state: str, procs: list[Proc]) -> None:  # pragma: no cover - child, killed
    rng = random.Random(7)
    stash = Stash(state)
    streams = [many_records(1, "a"), many_records(30, "b")]
    while True:
        p = rng.choice(procs)
        with contextlib.suppress(StashError):
            if rng.random() < 0.6:
                reg = registration(p.pid, p.start_time, ino=rng.randrange(3), token="t")
                stash.register(reg, rng.choice(streams))
            else:
                stash.remove_pid(p.pid)


@pytest.mark.timeout(120)
def test_readers_tolerate_a_tree_that_changes_under_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify and list, lock-free, while a writer churns: they never fail on a vanished entry."""
    state = str(tmp_path / "run")
    Stash(state).close()
    with sleepers(3) as procs:
        child = os.fork()
        if child == 0:  # pragma: no cover
            try:
                _churn(state, procs)
            finally:
                os._exit(0)
        try:
            for _ in range(40):
                with DirFd(None, state, readable=True) as root:
                    verify_settled(root.fd)  # must not raise
                assert stash_cli(["-s", state, "list", "--json"]) in (0, 1)
                assert stash_cli(["-s", state, "verify"]) in (0, 1)
            err = capsys.readouterr().err
            assert "cannot read the stash" not in err, err
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    stash = Stash(state)  # recovery after the kill
    assert stash.verify() == []
    stash.close()
    assert stash_cli(["-s", state, "verify"]) == 0
