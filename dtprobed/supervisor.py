"""Restart policy shared by the daemon's children: classify each exit, back off on repeats.

A child (the parser, the stash writer) that dies is read, never ignored: its
wait status is sorted into an :class:`ExitKind`, logged once with its own line,
and fed to a :class:`Backoff` that decides when the next start may happen.  A
child that keeps dying is restarted ever more slowly (capped), never in a tight
loop; one that has been healthy for a while is forgiven.

This module does no process management itself: ``ParserChild`` and
``StashWriterChild`` own their processes and may use these pieces.
"""

from __future__ import annotations

import enum
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Final

#: First delay after a failure, and the cap the doubling stops at.
BACKOFF_INITIAL: Final = 0.05
BACKOFF_MAX: Final = 5.0
#: A child that ran this long without failing resets the back-off.
BACKOFF_FORGIVE_AFTER: Final = 30.0
#: Consecutive failures after which a child is reported as "keeps dying".
FAILURES_REPORTED: Final = 5


class ExitKind(enum.Enum):
    """Why a child ended; each kind has its own log line and restart policy."""

    CLEAN = "exited cleanly"
    ERROR = "exited with an error status"
    SANDBOX = "was killed by its seccomp sandbox (SIGSYS)"
    KILLED_BY_US = "was killed by the supervisor"
    CRASH = "crashed"


@dataclass(frozen=True)
class ChildExit:
    kind: ExitKind
    code: int | None = None  # exit status for CLEAN/ERROR
    signal: int | None = None  # signal number otherwise

    def describe(self) -> str:
        if self.signal is not None:
            return f"{self.kind.value} ({signal.Signals(self.signal).name})"
        if self.code:
            return f"{self.kind.value} ({self.code})"
        return self.kind.value


def classify_exit(status: int, *, killed_by_us: bool = False) -> ChildExit:
    """Sort a ``waitpid`` status.

    *killed_by_us* says the supervisor sent SIGKILL itself (a timeout, a
    protocol violation); the exit is then not the child's fault.
    """
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGSYS:
            return ChildExit(ExitKind.SANDBOX, signal=sig)
        if killed_by_us and sig == signal.SIGKILL:
            return ChildExit(ExitKind.KILLED_BY_US, signal=sig)
        return ChildExit(ExitKind.CRASH, signal=sig)
    code = os.waitstatus_to_exitcode(status)
    return ChildExit(ExitKind.CLEAN if code == 0 else ExitKind.ERROR, code=code)


@dataclass
class Backoff:
    """Exponential back-off between restarts of one child.

    Call :meth:`failed` when the child breaks and :meth:`wait_time` before
    starting it again.  ``consecutive`` counts failures since the last
    forgiveness; ``keeps_dying`` says when to report it loudly.
    """

    initial: float = BACKOFF_INITIAL
    maximum: float = BACKOFF_MAX
    forgive_after: float = BACKOFF_FORGIVE_AFTER
    consecutive: int = 0
    _next_start: float = field(default=0.0, repr=False)
    _last_failure: float = field(default=0.0, repr=False)

    def failed(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.consecutive and now - self._last_failure > self.forgive_after:
            self.consecutive = 0
        self.consecutive += 1
        self._last_failure = now
        delay = min(self.maximum, self.initial * (2 ** (self.consecutive - 1)))
        self._next_start = now + delay

    @property
    def keeps_dying(self) -> bool:
        return self.consecutive >= FAILURES_REPORTED

    def wait_time(self, now: float | None = None) -> float:
        """Seconds to wait before the next start (0 when it may start now)."""
        now = time.monotonic() if now is None else now
        return max(0.0, self._next_start - now)
