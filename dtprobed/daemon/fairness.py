"""Fairness between callers, per uid: no local user can stop, stall or starve the daemon.

Every budget is per uid (the caller's fsuid, from the kernel's request header;
root is one uid like any other), so a hostile process can exhaust only its
own uid's share:

* :class:`FairLane` — a lane's worker threads take queued requests
  round-robin across uids, and one uid may occupy at most ``per_uid_workers``
  of them at once (all but one when the lane has several), so one uid's
  flood delays others by at most one request per worker;
* :class:`Budget` — DOF bytes queued or in flight, in all and per uid (the
  small lane has a budget of its own: a small registration is never refused
  because others queued large ones);
* :class:`Penalties` — a sender whose request made a child time out or crash
  (or whose memory could not be fetched in time) has its next requests
  refused at once, for a growing, bounded time;
* :class:`ParseMeter` — parser seconds per uid, decaying; a uid over its
  share leaves the small lane for the large one until its usage decays (a
  64 KiB DOF can still cost seconds to parse and stash).

Log volume is bounded per uid by :class:`dtprobed.device.ratelog.RateLog`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from common.argtypes import positive_int, positive_seconds
from common.dof_abi import DOF_MAXSZ
from common.limits import (
    DEFAULT_FETCH_TIMEOUT,
    DEFAULT_HEAVY_PARSE_SECONDS,
    DEFAULT_LOG_BURST,
    DEFAULT_LOG_RATE,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_BYTES_PER_UID,
    DEFAULT_MAX_QUEUED_PER_UID,
    DEFAULT_MAX_STUCK_FETCHES_PER_UID,
    DEFAULT_PENALTY_FIRST,
    DEFAULT_PENALTY_MAX,
    DEFAULT_SMALL_QUEUED_BYTES,
    DEFAULT_SMALL_QUEUED_BYTES_PER_UID,
)
from common.records import ArgsNative, ArgsXlat, ResultRecord
from dtprobed.device.fetch import FetchPool
from dtprobed.device.ratelog import RateLog

log = logging.getLogger("dtprobed")

Job = Callable[[], None]
_HALF_LIFE: Final = 2.0


@dataclass(frozen=True)
class Fairness:
    """The receiver's per-uid limits (defaults in :mod:`common.limits`)."""

    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    max_queued_bytes_per_uid: int = DEFAULT_MAX_QUEUED_BYTES_PER_UID
    small_queued_bytes: int = DEFAULT_SMALL_QUEUED_BYTES
    small_queued_bytes_per_uid: int = DEFAULT_SMALL_QUEUED_BYTES_PER_UID
    max_queued_per_uid: int = DEFAULT_MAX_QUEUED_PER_UID
    heavy_parse_seconds: float = DEFAULT_HEAVY_PARSE_SECONDS
    max_dof_size: int = DOF_MAXSZ


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """``dtprobed``'s fairness options (docs/security.md, "Fairness")."""
    g = ap.add_argument_group("fairness between callers (per uid)")
    g.add_argument("--fetch-timeout", type=positive_seconds, default=DEFAULT_FETCH_TIMEOUT)
    g.add_argument(
        "--max-stuck-fetches", type=positive_int, default=DEFAULT_MAX_STUCK_FETCHES_PER_UID
    )
    g.add_argument("--penalty-first", type=positive_seconds, default=DEFAULT_PENALTY_FIRST)
    g.add_argument("--penalty-max", type=positive_seconds, default=DEFAULT_PENALTY_MAX)
    g.add_argument("--log-burst", type=positive_int, default=DEFAULT_LOG_BURST)
    g.add_argument("--log-rate", type=positive_seconds, default=DEFAULT_LOG_RATE)
    g.add_argument("--max-queued-bytes", type=positive_int, default=DEFAULT_MAX_QUEUED_BYTES)
    g.add_argument(
        "--max-queued-bytes-per-uid", type=positive_int, default=DEFAULT_MAX_QUEUED_BYTES_PER_UID
    )
    g.add_argument("--max-queued-per-uid", type=positive_int, default=DEFAULT_MAX_QUEUED_PER_UID)
    g.add_argument(
        "--heavy-parse-seconds", type=positive_seconds, default=DEFAULT_HEAVY_PARSE_SECONDS
    )


def receiver_options(args: argparse.Namespace, max_dof_size: int) -> dict[str, Any]:
    """The fairness keyword arguments of :class:`~dtprobed.daemon.receiver.Receiver`."""
    rlog = logging.getLogger("dtprobed")
    return {
        "fetch": FetchPool(
            timeout=args.fetch_timeout, max_stuck_per_uid=args.max_stuck_fetches, log=rlog
        ),
        "fairness": Fairness(
            max_queued_bytes=args.max_queued_bytes,
            max_queued_bytes_per_uid=args.max_queued_bytes_per_uid,
            max_queued_per_uid=args.max_queued_per_uid,
            heavy_parse_seconds=args.heavy_parse_seconds,
            max_dof_size=max_dof_size,
        ),
        "penalties": Penalties(first=args.penalty_first, maximum=args.penalty_max),
        "ratelog": RateLog(rlog, burst=args.log_burst, rate=args.log_rate),
    }


_M_TRIM_THRESHOLD: Final = -1  # glibc mallopt parameters
_M_MMAP_THRESHOLD: Final = -3
#: Allocations at least this large are mmapped, and unmapped when freed; below it
#: (a request's 1 MiB fetch buffer, say) the heap is reused from request to request.
MMAP_THRESHOLD: Final = 4 << 20
#: Free heap top kept for the next request (glibc gives back more than this at once).
TRIM_THRESHOLD: Final = 1 << 20


def fix_mmap_threshold() -> None:
    """Have glibc mmap every allocation of ``MMAP_THRESHOLD`` or more, for good.

    By default glibc raises its mmap threshold to the size of each mmapped block
    that is freed (up to 32 MiB): after one big request, the next request's big
    buffers come from the heap and stay resident once freed, which ``malloc_trim``
    does not always undo (measured: +21 MiB of daemon RSS after a second 20 MB
    argument bomb, +2.5 MiB with the threshold fixed).  Fixing it also freezes
    the trim threshold at 128 KiB, so the heap top would be given back and
    taken again on every request: it is set to ``TRIM_THRESHOLD`` (at 8 MiB the
    bomb's leftovers stayed: +10 MiB).  Interleaved runs of
    bench/bench_receiver.py: 3-probe and 2000-probe registration medians within
    noise (±5 %) of glibc's defaults.  No-op without glibc.
    """
    with contextlib.suppress(AttributeError, OSError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def argument_bytes(records: Iterable[ResultRecord]) -> int:
    """Bytes of argument type strings in a record stream: what a small DOF amplifies.

    One string run may serve every probe of a DOF, so 65 KB can decode to 20 MB
    (610 probes × 255 types of 127 bytes); a result that heavy is followed by a heap
    trim, as a big DOF is, so the daemon returns to its rest size after it.
    """
    total = 0
    for rec in records:
        if isinstance(rec, (ArgsNative, ArgsXlat)):
            total += sum(map(len, rec.args))
    return total


class Budget:
    """Bytes in use, bounded in all and per uid.  Thread-safe."""

    def __init__(self, name: str, total: int, per_uid: int) -> None:
        self.name = name
        self.total = total
        self.per_uid = per_uid
        self._lock = threading.Lock()
        self._used = 0
        self._by_uid: dict[int, int] = {}

    def take(self, uid: int, size: int) -> str:
        """Reserve *size* bytes for *uid*: "" if done, else why not."""
        with self._lock:
            mine = self._by_uid.get(uid, 0)
            if mine + size > self.per_uid:
                return (
                    f"uid {uid} already has {mine} bytes of DOF in the {self.name} lane "
                    f"(its share is {self.per_uid})"
                )
            if self._used + size > self.total:
                return f"{self._used} bytes of DOF already in the {self.name} lane"
            self._used += size
            self._by_uid[uid] = mine + size
            return ""

    def give(self, uid: int, size: int) -> None:
        with self._lock:
            self._used -= size
            left = self._by_uid.get(uid, 0) - size
            if left > 0:
                self._by_uid[uid] = left
            else:
                self._by_uid.pop(uid, None)

    def used(self, uid: int | None = None) -> int:
        with self._lock:
            return self._used if uid is None else self._by_uid.get(uid, 0)


class Penalties:
    """Per-uid back-off after offences (a child timed out or crashed on its request)."""

    def __init__(
        self,
        *,
        first: float = DEFAULT_PENALTY_FIRST,
        maximum: float = DEFAULT_PENALTY_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first = first
        self.maximum = maximum
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[int, tuple[int, float]] = {}  # uid -> (strikes, refused until)

    def remaining(self, uid: int) -> float:
        """Seconds *uid* is still refused for (0 if not)."""
        with self._lock:
            state = self._state.get(uid)
        if state is None:
            return 0.0
        return max(0.0, float(state[1]) - float(self._clock()))

    def offend(self, uid: int) -> float:
        """Count an offence of *uid*; the refusal time it earned."""
        now = self._clock()
        with self._lock:
            strikes, until = self._state.get(uid, (0, 0.0))
            if now > until + 2 * self.maximum:
                strikes = 0  # clean for long enough: start again
            strikes += 1
            delay = float(min(self.first * 2.0 ** min(strikes - 1, 30), self.maximum))
            self._state[uid] = (strikes, now + delay)
            if len(self._state) > 4096:  # forget long-clean uids
                self._state = {
                    u: s for u, s in self._state.items() if now <= s[1] + 2 * self.maximum
                }
        return delay

    def strikes(self, uid: int) -> int:
        with self._lock:
            return self._state.get(uid, (0, 0.0))[0]


class ParseMeter:
    """Parser seconds per uid, decaying exponentially (half-life 2 s)."""

    def __init__(self, threshold: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self._clock = clock
        self._lock = threading.Lock()
        self._usage: dict[int, tuple[float, float]] = {}  # uid -> (seconds, as of)

    def _now_value(self, uid: int, now: float) -> float:
        value, when = self._usage.get(uid, (0.0, now))
        return value * math.exp2(-(now - when) / _HALF_LIFE)

    def add(self, uid: int, seconds: float) -> None:
        now = self._clock()
        with self._lock:
            value = self._now_value(uid, now) + seconds
            if value < 1e-4:
                self._usage.pop(uid, None)
            else:
                self._usage[uid] = (value, now)
            if len(self._usage) > 4096:
                self._usage = {
                    u: (self._now_value(u, now), now)
                    for u in self._usage
                    if self._now_value(u, now) >= 1e-3
                }

    def heavy(self, uid: int) -> bool:
        now = self._clock()
        with self._lock:
            return self._now_value(uid, now) > self.threshold


class LaneClosed(Exception):
    pass


class FairLane:
    """Worker threads serving per-uid queues round-robin (see the module docstring).

    An idle worker waits on an event of its own, and a new job wakes the one
    that went idle last: a steady trickle of requests is served by one thread
    (and the one fetch helper it last used) whose caches are warm, instead of
    each request going to the next thread in turn.  A worker that finishes a
    job takes the next takeable one itself before it goes idle, so a job held
    back by its uid's worker limit needs no wake-up.
    """

    def __init__(self, name: str, workers: int, *, max_queued_per_uid: int) -> None:
        self.name = name
        self.workers = workers
        self.per_uid_workers = max(1, workers - 1)
        self.max_queued_per_uid = max_queued_per_uid
        self._lock = threading.Lock()
        self._idle: list[threading.Event] = []  # idle workers' wake-ups, last idle last
        self._queues: dict[int, deque[Job]] = {}
        self._ring: deque[int] = deque()  # uids with queued work, in turn order
        self._running: dict[int, int] = {}
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"dtprobed-{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, uid: int, job: Job) -> str:
        """Queue *job* for *uid*: "" if queued, else why not (closed, queue full)."""
        with self._lock:
            if self._closed:
                raise LaneClosed(self.name)
            queue = self._queues.get(uid)
            if queue is None:
                queue = self._queues[uid] = deque()
                self._ring.append(uid)
            elif len(queue) >= self.max_queued_per_uid:
                return f"uid {uid} has {len(queue)} requests queued in the {self.name} lane"
            queue.append(job)
            if self._idle:
                self._idle.pop().set()
        return ""

    def queued(self, uid: int | None = None) -> int:
        with self._lock:
            if uid is None:
                return sum(len(q) for q in self._queues.values())
            queue = self._queues.get(uid)
            return len(queue) if queue is not None else 0

    def _take(self) -> tuple[int, Job] | None:
        """The next job in turn whose uid has a worker to spare (lock held)."""
        for _ in range(len(self._ring)):
            uid = self._ring[0]
            if self._running.get(uid, 0) >= self.per_uid_workers:
                self._ring.rotate(-1)
                continue
            queue = self._queues[uid]
            job = queue.popleft()
            self._ring.popleft()
            if queue:
                self._ring.append(uid)  # its next job waits for everyone else's turn
            else:
                del self._queues[uid]
            self._running[uid] = self._running.get(uid, 0) + 1
            return uid, job
        return None

    def _next(self) -> tuple[int, Job] | None:
        """Wait for a takeable job; None once the lane is closed and drained."""
        wake = threading.Event()
        while True:
            with self._lock:
                taken = self._take()
                if taken is not None:
                    return taken
                if self._closed and not self._queues:
                    return None
                wake.clear()
                self._idle.append(wake)
            wake.wait()

    def _work(self) -> None:
        while True:
            taken = self._next()
            if taken is None:
                return
            uid, job = taken
            try:
                job()
            except Exception:
                log.exception("%s lane: job failed (a bug)", self.name)
            finally:
                with self._lock:
                    left = self._running[uid] - 1
                    if left:
                        self._running[uid] = left
                    else:
                        del self._running[uid]

    def shutdown(self) -> None:
        """Refuse new jobs, run the queued ones, wait for the workers."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for wake in idle:
            wake.set()
        for thread in self._threads:
            thread.join()
