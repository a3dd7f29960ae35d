"""SIGKILL the writer at random instants; the next start-up must leave a consistent stash."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import StashError
from common.framing import FrameEncoder
from common.stash_protocol import Register, Remove
from dtprobed.stash.store import Stash
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


@pytest.mark.timeout(120)
def test_sigkill_of_the_real_writer_process(tmp_path: Path) -> None:
    """The same through `python -m dtprobed.stash.writer`, killed while it writes."""
    state = str(tmp_path / "run")
    rng = random.Random(99)
    enc = FrameEncoder()
    with sleepers(1) as (p,):
        for i in range(6):
            writer = subprocess.Popen(
                [sys.executable, "-m", "dtprobed.stash.writer", "--state-dir", state],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert writer.stdin is not None
            frames = [
                enc.encode(
                    Register(
                        reg=registration(p.pid, p.start_time, ino=i % 3), records=many_records(3000)
                    )
                ),
                enc.encode(Remove(pid=p.pid, gen=max(0, i - 2))),
            ]
            for f in frames:
                writer.stdin.write(f)
            writer.stdin.flush()
            time.sleep(0.25 + rng.uniform(0, 0.25))  # start-up, then somewhere in the work
            writer.kill()
            writer.wait()
            writer.stdin.close()
            assert writer.stdout is not None
            writer.stdout.close()
            stash = Stash(state)
            problems = stash.verify()
            stash.close()
            assert problems == [], f"iteration {i}: {problems}"


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
