"""SIGKILL the writer at random instants; the next start-up must leave a consistent stash."""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import PeerClosed, StashError
from common.framing import FrameDecoder, FrameEncoder
from common.records import ResultRecord
from common.stash_protocol import (
    MAX_REPLY_FRAME,
    Generation,
    Log,
    Problems,
    Progress,
    Register,
    Registration,
    Started,
    StashReply,
    Verify,
)
from dtprobed.oslib.fdio import read_exactly
from dtprobed.stash.store import Stash
from tests.stash.faults import WRAPPER, let_through, receive
from tests.stash.support import (
    Proc,
    dof_bytes,
    many_records,
    records_for,
    registration,
    sleepers,
    snapshot,
)

ITERATIONS = 200
REPO = Path(__file__).resolve().parents[2]


def _churn(state: str, procs: list[Proc], seed: int, ready_fd: int | None = None) -> None:
    """Run random operations for ever (until killed); errors of the operations are expected.

    Writes one byte to *ready_fd* once start-up recovery is done, so the
    killer's random delay covers the operations, not the start-up (which takes
    longer than the whole window on a loaded machine).
    """
    rng = random.Random(seed)
    streams = [many_records(1, "a"), many_records(20, "b"), many_records(120, "c")]
    dofs = [dof_bytes("x"), dof_bytes("y")]
    stash = Stash(state)
    if ready_fd is not None:
        os.write(ready_fd, b".")
    while True:
        p = rng.choice(procs)
        op = rng.random()
        try:
            if op < 0.55:
                reg = registration(
                    p.pid,
                    p.start_time,
                    ino=rng.randrange(3),
                    dof=rng.choice(dofs),
                    token=rng.choice(["t1", "t1", "t1", "t2"]),
                    dev=rng.choice([64768, 64768, 0]),
                )
                stash.register(reg, rng.choice(streams))
            elif op < 0.75:
                stash.remove(p.pid, rng.randrange(4))
            elif op < 0.82:
                stash.remove_pid(p.pid)
            else:
                items = stash.reparse_scan(force=True)
                if items:
                    item = rng.choice(items)
                    stash.write_reparsed(item, rng.choice([*streams, None]))
        except StashError:
            pass


@pytest.fixture
def tmpfs_path(tmp_path: Path) -> Iterator[Path]:
    """A temporary directory on tmpfs, as /run/dtrace is in production.

    The kill window is a few milliseconds; on a journaling disk file system a
    120-probe registration takes longer than that, so kills would rarely land
    in a committed tree and the test would prove little.
    """
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="dtprobed-crash-", dir="/dev/shm") as tmp:
        yield Path(tmp)


@pytest.mark.timeout(120)
def test_sigkill_at_random_points_then_recover(tmpfs_path: Path) -> None:
    tmp_path = tmpfs_path
    state = tmp_path / "run"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    rng = random.Random(1234)
    killed_mid_tree = 0
    with sleepers(3) as procs:
        Stash(str(state)).close()
        for i in range(ITERATIONS):
            ready_r, ready_w = os.pipe()
            child = os.fork()
            if child == 0:  # pragma: no cover - the child never returns
                try:
                    os.close(ready_r)
                    _churn(str(state), procs, i, ready_w)
                finally:
                    os._exit(0)
            os.close(ready_w)
            assert select.select([ready_r], [], [], 30)[0], f"iteration {i}: writer never started"
            assert os.read(ready_r, 1) == b"."
            os.close(ready_r)
            time.sleep(rng.uniform(0, 0.012))
            os.kill(child, signal.SIGKILL)
            _, status = os.waitpid(child, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            stash = Stash(str(state))  # start-up recovery
            problems = stash.verify()
            stash.close()
            assert problems == [], f"iteration {i}: {problems}"
            if os.listdir(state / "stash/dof-pid"):
                killed_mid_tree += 1
    assert snapshot(str(outside)) == {"keep": ("file", 0o644, 1, 1, b"x".hex())}
    # the kills really landed in populated trees
    assert killed_mid_tree > ITERATIONS // 4, f"only {killed_mid_tree} of {ITERATIONS} kills"


def _writer_killed_at(
    state: str, reg: Registration, records: list[ResultRecord], n: int
) -> list[str]:
    """Run the real writer process; SIGKILL it as it enters its *n*-th write-type call
    of the Register (0: never).  Returns the calls the Register made up to then.

    The writer runs under a seccomp user-notification filter (tests/stash/faults.py,
    loaded by a wrapper that then execs ``python -m dtprobed.stash.writer``): every
    write-type call waits for this test's answer.  Calls before the Register (start-up,
    recovery, a Verify to know start-up is over) are let through uncounted; the
    *n*-th of the Register is never answered: the writer is killed while blocked in
    it, so the call never runs and the kill lands exactly between call n-1 and n.
    """
    parent_sock, child_sock = socket.socketpair()
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRAPPER,
            str(child_sock.fileno()),
            sys.executable,
            "-m",
            "dtprobed.stash.writer",
            "--state-dir",
            state,
            # Progress frames are writes at times of the clock's choosing: none here,
            # so that the n-th write-type call is the same one in every run
            "--progress-interval=86400",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=[child_sock.fileno()],
        cwd=REPO,
    )
    child_sock.close()
    assert writer.stdin is not None and writer.stdout is not None
    _, fds, _, _ = socket.recv_fds(parent_sock, 16, 1)
    parent_sock.close()
    assert fds, "the wrapper sent no notification fd"
    nfd = fds[0]
    armed = threading.Event()
    calls: list[str] = []

    def supervise() -> None:
        while (got := receive(nfd)) is not None:
            req, name = got
            if armed.is_set():
                calls.append(name)
                if len(calls) == n:
                    writer.kill()  # blocked in this call, which therefore never runs
                    continue
            let_through(nfd, req)

    thread = threading.Thread(target=supervise, daemon=True)
    thread.start()
    decoder: FrameDecoder[StashReply] = FrameDecoder(StashReply, MAX_REPLY_FRAME)
    out = writer.stdout.fileno()
    enc = FrameEncoder()
    try:
        writer.stdin.write(enc.encode(Verify()))
        writer.stdin.flush()
        while isinstance(
            reply := decoder.read(lambda k: read_exactly(out, k)), Log | Progress | Started
        ):
            pass
        assert reply == Problems(problems=[]), reply
        armed.set()  # start-up is over: from now on every write-type call is the Register's
        writer.stdin.write(enc.encode(Register(reg=reg, records=records)))
        writer.stdin.flush()
        try:
            while isinstance(reply := decoder.read(lambda k: read_exactly(out, k)), Log | Progress):
                pass
            assert n == 0, f"the writer answered {reply} though killed at call {n}"
            assert isinstance(reply, Generation), reply
        except PeerClosed:
            assert n > 0, "the writer died unkilled"
        writer.stdin.close()
        status = writer.wait(60)
        assert status == (-signal.SIGKILL if n else 0), status
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        thread.join(60)
        os.close(nfd)
        writer.stdout.close()
    return calls


@pytest.mark.timeout(300)
def test_sigkill_of_the_real_writer_process_mid_commit(tmp_path: Path) -> None:
    """The real writer killed inside a Register, at known points from its 2nd write to
    its reply: recovery + verify leave none of it (killed before the commit point, the
    generation symlink) or all of it (killed after it, before the reply)."""
    rng = random.Random(99)
    records = many_records(200)
    with sleepers(1) as (p,):
        reg = registration(p.pid, p.start_time, ino=2)

        def base(name: str) -> str:
            state = str(tmp_path / name)
            stash = Stash(state)
            stash.register(registration(p.pid, p.start_time, ino=1), many_records(5, "k"))
            stash.close()
            return state

        state = base("calibrate")
        before = snapshot(state)
        calls = _writer_killed_at(state, reg, records, 0)
        after = snapshot(state)
        assert len(calls) > 100, calls
        commit = len(calls) - calls[::-1].index("symlinkat")  # 1-based: the $gen symlink
        # then next-gen + 1 and the reply
        # (what follows is the writer's exit: its lock file goes)
        assert calls[commit : commit + 2] == ["ftruncate", "write"], calls[commit - 3 :]
        points = {2, 3, commit - 1, commit, commit + 1, commit + 2}
        points |= set(rng.sample(range(4, commit - 1), 10))
        for n in sorted(points):
            state = base(f"kill-{n}")
            made = _writer_killed_at(state, reg, records, n)
            assert len(made) == n  # killed in call n: calls 1..n-1 ran, n did not
            # after the commit began (a write of it ran), before it ended (the reply)
            assert 2 <= n <= len(calls)
            stash = Stash(state)  # start-up recovery
            problems = stash.verify()
            stash.close()
            assert problems == [], f"killed at call {n} ({made[-1]}): {problems}"
            if n <= commit:  # the symlink never ran: none of the registration
                assert snapshot(state) == before, f"killed at call {n} ({made[-1]})"
            else:  # committed, killed before next-gen + 1 or the reply: all of it
                assert snapshot(state) == after, f"killed at call {n} ({made[-1]})"


def test_interrupted_register_is_rolled_back(tmp_path: Path) -> None:
    """A mapping written but never committed (no generation) disappears at start-up."""
    state = tmp_path / "run"
    with sleepers(1) as (p,):
        stash = Stash(str(state))
        stash.register(
            registration(p.pid, p.start_time, ino=1), records_for("k", [("m", "f", "a", 1)])
        )
        before = snapshot(str(state))
        stash.register(
            registration(p.pid, p.start_time, ino=2), records_for("u", [("m", "f", "b", 1)])
        )
        os.unlink(state / f"stash/dof-pid/{p.pid}/1")  # as if killed before the commit point
        os.truncate(state / f"stash/dof-pid/{p.pid}/next-gen", 1)
        stash.close()
        stash = Stash(str(state))
        assert stash.verify() == []
        assert snapshot(str(state)) == before
