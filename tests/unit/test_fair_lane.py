"""FairLane: round-robin across uids, the per-uid worker limit, LIFO wake-ups, shutdown."""

from __future__ import annotations

import threading
import time

from dtprobed.daemon.fairness import FairLane, LaneClosed
from tests.support.clients import wait_until


def test_a_trickle_of_jobs_is_served_by_the_worker_that_went_idle_last() -> None:
    lane = FairLane("t", 3, max_queued_per_uid=8)
    try:
        threads: list[str] = []
        for _ in range(30):
            done = threading.Event()

            def job(done: threading.Event = done) -> None:
                threads.append(threading.current_thread().name)
                done.set()

            assert lane.submit(0, job) == ""
            assert done.wait(5)
            wait_until("all workers idle", lambda: len(lane._idle) == 3)
        # the first job may go to any worker; from then on the last idle one takes it
        assert len(set(threads[1:])) == 1, threads
    finally:
        lane.shutdown()


def test_one_uid_gets_all_but_one_worker_and_others_still_get_through() -> None:
    lane = FairLane("t", 3, max_queued_per_uid=8)
    release = threading.Event()
    running: list[str] = []
    lock = threading.Lock()

    def blocking(tag: str) -> None:
        with lock:
            running.append(tag)
        release.wait(10)

    try:
        for i in range(3):
            assert lane.submit(1, lambda i=i: blocking(f"a{i}")) == ""
        wait_until("two of uid 1's jobs", lambda: len(running) == 2)
        time.sleep(0.05)
        assert sorted(running) == ["a0", "a1"]  # the third waits: per-uid limit 2 of 3
        other = threading.Event()
        assert lane.submit(2, other.set) == ""
        assert other.wait(5)  # uid 2 is served by the spare worker meanwhile
        assert lane.queued(1) == 1
        release.set()
        wait_until("uid 1's third job once one of its jobs ended", lambda: len(running) == 3)
    finally:
        release.set()
        lane.shutdown()


def test_shutdown_runs_what_is_queued_then_refuses() -> None:
    lane = FairLane("t", 1, max_queued_per_uid=8)
    gate = threading.Event()
    ran: list[int] = []
    assert lane.submit(0, lambda: gate.wait(5)) == ""
    for i in range(4):
        assert lane.submit(0, lambda i=i: ran.append(i)) == ""
    closer = threading.Thread(target=lane.shutdown)
    closer.start()
    gate.set()
    closer.join(5)
    assert not closer.is_alive()
    assert ran == [0, 1, 2, 3]
    try:
        lane.submit(0, lambda: None)
    except LaneClosed:
        pass
    else:
        raise AssertionError("a closed lane took a job")


def test_a_full_queue_refuses_with_a_reason() -> None:
    lane = FairLane("t", 1, max_queued_per_uid=2)
    gate = threading.Event()
    try:
        assert lane.submit(5, lambda: gate.wait(5)) == ""
        wait_until("the first job taken", lambda: lane.queued(5) == 0)
        assert lane.submit(5, lambda: None) == ""
        assert lane.submit(5, lambda: None) == ""
        assert lane.submit(5, lambda: None) == "uid 5 has 2 requests queued in the t lane"
        assert lane.submit(6, lambda: None) == ""  # another uid's own queue
    finally:
        gate.set()
        lane.shutdown()
