"""Small commands of other processes run between the slices of a long one, all or nothing.

In-process: the ``Stash.interleave`` hook runs a command at a yield point of a
long Register or RemovePid, exactly as the writer's priority channel does; the
tree must then be the tree of the two commands run one after the other, and a
long command that fails after the small one committed leaves only the small
one.  Through the writer child: a small registration sent while a long one
holds the main channel is answered on the priority channel; one of the same
process is answered ``Busy`` there and waits for the long one.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.errors import StashError
from dtprobed.children.writer import StashWriterChild
from dtprobed.stash.store import RemovalDeferred, Stash
from tests.stash.support import many_records, registration, sleepers, snapshot

BIG = 600  # probes: 600 / YIELD_EVERY yield points
#: Probes of the writer child's long registration: about half a second of writing here, far
#: longer than the few small commands the test sends meanwhile.
LONG = 20000


def _once(fn: Callable[[], object]) -> Callable[[], None]:
    done: list[object] = []

    def hook() -> None:
        if not done:
            done.append(fn())

    hook.done = done  # type: ignore[attr-defined]
    return hook


def test_register_interleaved_is_the_two_in_a_row(tmp_path: Path) -> None:
    with sleepers(2) as (a, b):
        big = registration(a.pid, a.start_time, ino=10)
        small = registration(b.pid, b.start_time, ino=11)
        sequential = Stash(str(tmp_path / "seq"))
        sequential.register(big, many_records(BIG))
        sequential.register(small, many_records(3, "small"))
        sequential.close()

        stash = Stash(str(tmp_path / "mixed"))
        seen: list[tuple[int, str] | None] = []

        def nested() -> int:
            seen.append(stash.busy)
            return stash.run_interleaved(lambda: stash.register(small, many_records(3, "small")))

        hook = _once(nested)
        stash.interleave = hook
        assert stash.register(big, many_records(BIG)) == 0
        assert hook.done == [0]  # type: ignore[attr-defined]  # the small one ran inside
        assert seen == [(a.pid, f"{big.dev}-{big.ino}")]
        assert stash.busy is None
        assert stash.verify() == []
        assert stash.usage.probes == BIG + 3
        stash.close()
        assert snapshot(str(tmp_path / "mixed")) == snapshot(str(tmp_path / "seq"))


def test_remove_pid_interleaved_is_the_two_in_a_row(tmp_path: Path) -> None:
    with sleepers(2) as (a, b):
        big = registration(a.pid, a.start_time, ino=10)
        small = registration(b.pid, b.start_time, ino=11)
        sequential = Stash(str(tmp_path / "seq"))
        sequential.register(small, many_records(3, "small"))
        sequential.close()

        stash = Stash(str(tmp_path / "mixed"))
        stash.register(big, many_records(BIG))
        hook = _once(
            lambda: stash.run_interleaved(lambda: stash.register(small, many_records(3, "small")))
        )
        stash.interleave = hook
        stash.remove_pid(a.pid)
        assert hook.done == [0]  # type: ignore[attr-defined]
        assert stash.verify() == []
        assert stash.usage.probes == 3
        stash.close()
        assert snapshot(str(tmp_path / "mixed")) == snapshot(str(tmp_path / "seq"))


def test_long_register_failing_after_a_small_one_leaves_only_the_small_one(
    tmp_path: Path,
) -> None:
    with sleepers(2) as (a, b):
        big = registration(a.pid, a.start_time, ino=10)
        small = registration(b.pid, b.start_time, ino=11)
        only_small = Stash(str(tmp_path / "seq"))
        only_small.register(small, many_records(3, "small"))
        only_small.close()

        stash = Stash(str(tmp_path / "mixed"))
        calls = [0]

        def hook() -> None:
            calls[0] += 1
            if calls[0] == 1:
                stash.run_interleaved(lambda: stash.register(small, many_records(3, "small")))
            elif calls[0] == 3:
                raise OSError(errno.EIO, "injected failure of the long registration")

        stash.interleave = hook
        with pytest.raises(StashError) as err:
            stash.register(big, many_records(BIG))
        assert err.value.errno == errno.EIO
        assert stash.verify() == []
        assert stash.usage.probes == 3  # the long one's reservation was given back
        stash.interleave = None
        # the quota counts are the tree's: a fresh writer's index agrees
        stash.close()
        again = Stash(str(tmp_path / "mixed"))
        assert again.usage.probes == 3
        again.close()
        assert snapshot(str(tmp_path / "mixed")) == snapshot(str(tmp_path / "seq"))


def test_writer_killed_after_an_interleaved_commit_keeps_only_that_one(tmp_path: Path) -> None:
    """SIGKILL in the middle of the long registration, after a small one committed inside
    it: start-up recovery rolls the long one back and keeps the small one."""
    with sleepers(2) as (a, b):
        big = registration(a.pid, a.start_time, ino=10)
        small = registration(b.pid, b.start_time, ino=11)
        only_small = Stash(str(tmp_path / "seq"))
        only_small.register(small, many_records(3, "small"))
        only_small.close()

        state = str(tmp_path / "mixed")
        Stash(state).close()
        child = os.fork()
        if child == 0:  # the writer that dies
            try:
                stash = Stash(state)
                calls = [0]

                def hook() -> None:
                    calls[0] += 1
                    if calls[0] == 1:
                        stash.run_interleaved(
                            lambda: stash.register(small, many_records(3, "small"))
                        )
                    elif calls[0] == 5:
                        os.kill(os.getpid(), signal.SIGKILL)

                stash.interleave = hook
                stash.register(big, many_records(BIG))
            finally:
                os._exit(1)  # not reached: killed at the fifth yield point
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert (tmp_path / "mixed" / "stash" / "dof-pid" / str(a.pid)).exists()  # half done
        recovered = Stash(state)
        assert recovered.verify() == []
        assert recovered.usage.probes == 3
        recovered.close()
        assert snapshot(state) == snapshot(str(tmp_path / "seq"))


def test_writer_answers_other_processes_on_the_priority_channel(tmp_path: Path) -> None:
    writer = StashWriterChild(str(tmp_path / "run"), timeout=30)
    writer.start()
    try:
        with sleepers(3) as (a, b, c):
            big = registration(a.pid, a.start_time, ino=10)
            small = registration(b.pid, b.start_time, ino=11)
            same_pid = registration(a.pid, a.start_time, ino=12)
            big_done = threading.Event()
            results: dict[str, object] = {}

            def long_one() -> None:
                try:
                    results["big"] = writer.register_records(big, many_records(LONG))
                except BaseException as exc:  # reported by the assertions below
                    results["big"] = exc
                finally:
                    big_done.set()

            thread = threading.Thread(target=long_one)
            thread.start()
            # the writer is writing the long one once its process directory exists (an
            # idle writer would answer the priority channel at once, between commands)
            started = tmp_path / "run" / "stash" / "dof-pid" / str(a.pid)
            while not started.exists() and not big_done.is_set():
                time.sleep(0.001)
            assert not big_done.is_set()
            assert writer.register_records(small, many_records(3, "small")) == 0
            writer.remove_pid(small.pid)
            answered = writer.priority_answered
            # the same process: Busy on the priority channel, then the main one after it
            gen = writer.register_records(same_pid, many_records(3, "other"))
            assert big_done.is_set()
            thread.join()
            assert results["big"] == 0 and gen == 1
            assert answered >= 2  # the small registration and its removal overtook
            assert writer.priority_answered == answered  # Busy is not an answer
            third = registration(c.pid, c.start_time, ino=13)
            assert writer.register_records(third, many_records(3, "third")) == 0
            assert writer.verify() == []
            writer.remove_pid(a.pid)  # 20000 files: not left for pytest's cleanup of tmp_path
    finally:
        writer.stop()


def test_a_deferrable_removal_stops_for_a_registration_and_finishes_when_sent_again(
    tmp_path: Path,
) -> None:
    """In-process: a deferral requested at a yield point of an exit prune stops it there,
    with the process's generations gone; sent again, it removes the rest. Not deferrable
    (no may_defer), the same request changes nothing."""
    with sleepers(1) as (a,):
        reg = registration(a.pid, a.start_time, ino=10)
        stash = Stash(str(tmp_path / "run"))
        pid_dir = tmp_path / "run" / "stash" / "dof-pid" / str(a.pid)
        probes_dir = tmp_path / "run" / "probes" / str(a.pid)
        stash.register(reg, many_records(BIG))
        stash.interleave = stash.request_deferral
        stash.remove_pid(a.pid)  # may_defer not given: the request is ignored
        assert not pid_dir.exists() and not probes_dir.exists()

        stash.register(reg, many_records(BIG))
        with pytest.raises(RemovalDeferred):
            stash.remove_pid(a.pid, may_defer=True)
        assert pid_dir.is_dir() and not (pid_dir / "0").is_symlink()  # un-committed
        left = sum(1 for _ in probes_dir.rglob("*"))
        assert 0 < left < sum(1 for _ in (tmp_path / "run").rglob("*"))
        assert stash.busy is None and stash.usage.probes == 0
        stash.interleave = None
        stash.remove_pid(a.pid)
        assert not pid_dir.exists() and not probes_dir.exists()
        assert stash.verify() == []
        stash.request_deferral()  # nothing in progress: nothing to defer later
        stash.register(reg, many_records(3))
        stash.remove_pid(a.pid, may_defer=True)
        assert not pid_dir.exists()
        stash.close()


def test_a_new_process_finds_what_a_deferred_removal_left_and_replaces_it(
    tmp_path: Path,
) -> None:
    """A deferred exit prune leaves dof-pid/$pid without generations and out of the
    index.  The pid's next registration, by a new process (another start time), finds
    that directory, removes it and starts afresh: the tree is the one a registration
    into an empty stash makes (the identity check is skipped only when no directory
    is there)."""
    with sleepers(1) as (a,):
        stash = Stash(str(tmp_path / "run"))
        stash.register(registration(a.pid, a.start_time + 1, ino=10), many_records(BIG))
        stash.interleave = stash.request_deferral
        with pytest.raises(RemovalDeferred):
            stash.remove_pid(a.pid, may_defer=True)
        stash.interleave = None
        assert (tmp_path / "run" / "stash" / "dof-pid" / str(a.pid)).is_dir()
        new = registration(a.pid, a.start_time, ino=11)
        assert stash.register(new, many_records(3)) == 0
        assert stash.verify() == []
        fresh = Stash(str(tmp_path / "fresh"))
        fresh.register(new, many_records(3))
        assert snapshot(str(tmp_path / "run"), with_xattrs=True) == snapshot(
            str(tmp_path / "fresh"), with_xattrs=True
        )
        stash.close()
        fresh.close()


def test_an_exit_prune_gives_way_to_a_large_registration(tmp_path: Path) -> None:
    """Through the writer child: a registration too large for the priority channel,
    sent while an exit prune of LONG probes holds the main one, is answered before the
    prune has finished; the prune then finishes, and the stash is consistent. The writer
    is stopped (SIGSTOP) mid-prune until the registration's Yield is on its way, so the
    prune cannot end first however the machine schedules the test."""
    writer = StashWriterChild(str(tmp_path / "run"), timeout=30)
    writer.start()
    try:
        with sleepers(2) as (a, b):
            gone = registration(a.pid, a.start_time, ino=10)
            large = registration(b.pid, b.start_time, ino=11)
            assert writer.register_records(gone, many_records(LONG)) == 0
            finished: list[str] = []
            failure: list[BaseException] = []

            def run(name: str, call: Callable[[], object]) -> threading.Thread:
                def body() -> None:
                    try:
                        call()
                    except BaseException as exc:  # reported by the assertions below
                        failure.append(exc)
                    finally:
                        finished.append(name)

                thread = threading.Thread(target=body)
                thread.start()
                return thread

            prune = run("prune", lambda: writer.remove_pid(a.pid, may_defer=True))
            # the prune is under way once its generation is gone (its first step)
            first_gen = tmp_path / "run" / "stash" / "dof-pid" / str(a.pid) / "0"
            while first_gen.is_symlink() and not finished:
                time.sleep(0.001)
            writer_pid = writer.pid
            assert writer_pid is not None
            os.kill(writer_pid, signal.SIGSTOP)
            try:
                assert finished == []
                register = run(
                    "register", lambda: writer.register_records(large, many_records(2000, "large"))
                )
                deadline = time.monotonic() + 30
                while writer._registers_waiting == 0 and time.monotonic() < deadline:
                    time.sleep(0.001)  # its Yield goes out next
                time.sleep(0.05)  # for the Yield to reach the pipe
            finally:
                os.kill(writer_pid, signal.SIGCONT)
            register.join()
            prune.join()
            assert failure == []
            assert finished == ["register", "prune"]
            assert writer.removals_deferred == 1
            assert not (tmp_path / "run" / "probes" / str(a.pid)).exists()
            assert not (tmp_path / "run" / "stash" / "dof-pid" / str(a.pid)).exists()
            assert writer.verify() == []
            writer.remove_pid(b.pid)
    finally:
        writer.stop()


def test_an_exit_prune_lets_a_waiting_registration_have_the_writer_first(tmp_path: Path) -> None:
    """The exit watcher prunes one process after another. A large registration that
    waits for the main pipe while one prune (not deferrable: nothing asks it to give way)
    holds it has the pipe before the watcher's next prune, which waits until the
    registration holds it (the watcher's thread would otherwise take the pipe again at
    once, and that prune would run first)."""
    writer = StashWriterChild(str(tmp_path / "run"), timeout=30)
    writer.start()
    try:
        with sleepers(3) as (a, b, c):
            writer.register_records(registration(a.pid, a.start_time, ino=10), many_records(LONG))
            writer.register_records(registration(c.pid, c.start_time, ino=12), many_records(300))
            finished: list[str] = []

            def exit_prunes() -> None:
                writer.remove_pid(a.pid)  # LONG probes, holds the main pipe
                finished.append("first prune")
                writer.remove_pid(c.pid, may_defer=True)
                finished.append("next prune")

            def large_registration() -> None:
                large = registration(b.pid, b.start_time, ino=11)
                writer.register_records(large, many_records(2000, "l"))
                finished.append("registration")

            prunes = threading.Thread(target=exit_prunes)
            prunes.start()
            first_gen = tmp_path / "run" / "stash" / "dof-pid" / str(a.pid) / "0"
            while first_gen.is_symlink() and not finished:
                time.sleep(0.001)
            register = threading.Thread(target=large_registration)
            register.start()
            register.join()
            prunes.join()
            assert finished == ["first prune", "registration", "next prune"]
            assert writer.verify() == []
            writer.remove_pid(b.pid)
    finally:
        writer.stop()
