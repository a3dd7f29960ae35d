"""One mechanism for the daemon's children: start, feed, time out, reap, classify, back off.

Both children — the sandboxed parser and the stash writer — are separate
Python processes reached through two pipes: requests go down the child's fd 0,
answers come up its fd 1.  :class:`ChildSlot` owns the one live child of a
role and everything the host does with it:

* **start**: ``python -I`` with cwd ``/`` (no ``PYTHON*`` variables, nothing
  from the daemon's directory on ``sys.path``), both pipes enlarged to 1 MiB
  where allowed, the parent's ends non-blocking;
* **feed**: :meth:`ChildSlot.send` writes a frame piece by piece, waiting with
  ``poll`` for room in the pipe, so a write never blocks past the deadline even
  when only one page of the pipe is free (a blocking 64 KiB write after
  ``select`` said "writable" could);
* **read**: :meth:`ChildSlot.receive_some` returns what the pipe holds within
  the deadline;
* **time out, reap, classify**: a child that misses a deadline, closes its pipe
  or breaks the protocol is killed (if still alive), reaped, and its exit status
  classified (:func:`classify_exit`: clean, error status, killed by its
  seccomp filter, killed by us, crashed); the caller raises the returned
  :class:`~common.errors.ChildFailed` (or :class:`~common.errors.ChildTimeout`,
  :class:`~common.errors.SandboxViolation`);
* **back off**: after :data:`FREE_RESTARTS` consecutive failures each restart
  waits an exponentially growing, bounded time, and requests in that window
  fail at once with a message saying so.

Facts we rely on:

* an unreaped child keeps its pid, so killing ``Popen.pid`` before ``wait()``
  can never hit a recycled pid;
* a seccomp ``KILL_PROCESS`` shows as death by SIGSYS in the wait status;
* Python ignores SIGPIPE, so writing to a dead child's pipe is ``EPIPE``;
* closing the child's fd 0 *after* killing it keeps it from exiting 0 first.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from common.errors import ChildFailed, ChildTimeout, SandboxViolation
from dtprobed.oslib.procfs import stat_of

#: Consecutive failures that restart at once; later ones back off.
FREE_RESTARTS: Final = 3
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 30.0
#: How long a child that closed its pipe gets to finish exiting before SIGKILL.
EXIT_GRACE: Final = 1.0
#: One read of a child's answer: below glibc's mmap threshold and far below its trim
#: threshold, so a read's buffer comes from the heap and goes back to it (a 1 MiB
#: buffer made two brk calls, grow and trim, of every read: measured with strace).
_READ_CHUNK: Final = 64 << 10
_F_SETPIPE_SZ: Final = 1031
_PIPE_SIZE: Final = 1 << 20  # fewer wake-ups for big frames; best effort


class ExitKind(enum.Enum):
    CLEAN = "exited cleanly"
    ERROR = "exited with an error status"
    SANDBOX_VIOLATION = "killed by its sandbox (SIGSYS)"
    KILLED = "killed by us"
    CRASH = "crashed"


def classify_exit(returncode: int, *, killed_by_us: bool) -> tuple[ExitKind, str]:
    """What a child's exit status means, and a phrase for the log line."""
    if returncode == 0:
        return ExitKind.CLEAN, "exited with status 0"
    if returncode > 0:
        return ExitKind.ERROR, f"exited with status {returncode}"
    sig = -returncode
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
    if sig == signal.SIGSYS:
        return ExitKind.SANDBOX_VIOLATION, "was killed by its seccomp filter (SIGSYS)"
    if sig == signal.SIGKILL and killed_by_us:
        return ExitKind.KILLED, "was killed by us (SIGKILL)"
    return ExitKind.CRASH, f"crashed with signal {name}"


class PriorityChannel:
    """A second pair of pipes to a child, for requests that may overtake a long one.

    The stash writer reads it between commands and at the yield points of a long
    command (docs/protocol.md).  Several threads may use the slot's child at once
    through it, so its fds are closed only under :attr:`lock` (a user holds it
    for its whole exchange): a number is never reused under a user's feet.
    """

    def __init__(self, to_child: int, from_child: int) -> None:
        self.to_child = to_child
        self.from_child = from_child
        self.lock = threading.Lock()
        self.closed = False
        self.poll_in = select.poll()
        self.poll_in.register(from_child, select.POLLIN)
        self.poll_out = select.poll()
        self.poll_out.register(to_child, select.POLLOUT)

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                for fd in (self.to_child, self.from_child):
                    with contextlib.suppress(OSError):
                        os.close(fd)


class RunningChild:
    """One live child and the parent's ends of its two pipes (and of its priority channel)."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        to_child: int,
        from_child: int,
        priority: PriorityChannel | None = None,
    ) -> None:
        self.proc = proc
        self.to_child = to_child
        self.from_child = from_child
        self.priority = priority
        self.requests = 0
        self.started = time.monotonic()
        self.killed_by_us = False
        self.poll_in = select.poll()
        self.poll_in.register(from_child, select.POLLIN)
        self.poll_out = select.poll()
        self.poll_out.register(to_child, select.POLLOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        st = stat_of(self.proc.pid)
        return st.cpu_seconds if st is not None else 0.0

    def readable(self) -> bool:
        """Something (or EOF) is waiting in the answer pipe."""
        return bool(self.poll_in.poll(0))


class ChildSlot:
    """The live child of one role (see the module docstring).  Not thread-safe:
    the client classes serialise their exchanges with a lock of their own."""

    def __init__(
        self,
        role: str,
        argv: Callable[[], Sequence[str]],
        log: logging.Logger,
        *,
        timeouts_back_off: bool = True,
        priority_channel: bool = False,
    ) -> None:
        """*timeouts_back_off* False: a child killed for a timeout does not count
        towards the back-off (a slow request is its sender's fault, not the role's:
        the next sender gets a fresh child at once).  *priority_channel*: the child
        also gets a :class:`PriorityChannel`, its fds named by a last argument
        ``--priority-fds=READ,WRITE``."""
        self.role = role  # "parser child", "stash writer": starts every log line
        self._priority_channel = priority_channel
        self._timeouts_back_off = timeouts_back_off
        self._argv = argv
        self.log = log
        self.child: RunningChild | None = None
        self.failures = 0
        self._not_before = 0.0

    @property
    def pid(self) -> int | None:
        child = self.child
        return child.pid if child is not None else None

    # --- start and stop --------------------------------------------------------------
    def start(self) -> RunningChild:
        """A new child (the slot must be empty); ChildFailed while backing off."""
        assert self.child is None
        now = time.monotonic()
        if now < self._not_before:
            raise ChildFailed(
                f"{self.role} failed {self.failures} times in a row; "
                f"not restarting it for another {self._not_before - now:.1f} s"
            )
        req_r, req_w = os.pipe()
        rec_r, rec_w = os.pipe()
        # the priority channel's ends: host writes pri_w, reads pri_reply_r
        extra = (*os.pipe(), *os.pipe()) if self._priority_channel else ()
        argv = list(self._argv())
        child_ends: tuple[int, ...] = ()
        if extra:
            child_ends = (extra[0], extra[3])
            argv.append(f"--priority-fds={extra[0]},{extra[3]}")
        try:
            for fd in (req_w, rec_w):
                # over /proc/sys/fs/pipe-max-size for unprivileged users: keep 64 KiB
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
            proc = subprocess.Popen(
                argv, stdin=req_r, stdout=rec_w, close_fds=True, pass_fds=child_ends, cwd="/"
            )
        except BaseException:
            for fd in (req_r, req_w, rec_r, rec_w, *extra):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(rec_w)
        os.set_blocking(req_w, False)
        os.set_blocking(rec_r, False)
        priority = None
        if extra:
            for fd in child_ends:
                os.close(fd)
            os.set_blocking(extra[1], False)
            os.set_blocking(extra[2], False)
            priority = PriorityChannel(extra[1], extra[2])
        self.child = RunningChild(proc, req_w, rec_r, priority)
        self.log.debug("%s %d started: %s", self.role, proc.pid, " ".join(argv))
        return self.child

    def reap(self, child: RunningChild, *, kill: bool, grace: float = EXIT_GRACE) -> int:
        """Kill (if asked, or if it outlives *grace*), reap, close; the child is forgotten."""
        if self.child is child:
            self.child = None
        if kill and child.proc.poll() is None:
            child.killed_by_us = True
            child.proc.kill()
        for fd in (child.to_child, child.from_child):  # after the kill (module docstring)
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            return child.proc.wait(grace)
        except subprocess.TimeoutExpired:
            child.killed_by_us = True
            child.proc.kill()
            return child.proc.wait()
        finally:
            # once it is gone: a priority exchange in flight then ends (EOF) and lets go
            if child.priority is not None:
                child.priority.close()

    def stop(self, why: str) -> None:
        """Close the request pipe (the child exits 0 at EOF), then reap it; log how it went."""
        child = self.child
        if child is None:
            return
        status = self.reap(child, kill=False)
        kind, phrase = classify_exit(status, killed_by_us=child.killed_by_us)
        level = logging.DEBUG if kind is ExitKind.CLEAN else logging.WARNING
        self.log.log(level, "%s %d %s (%s)", self.role, child.pid, phrase, why)

    def failed(
        self, child: RunningChild, why: str, *, kill: bool, timeout: bool = False
    ) -> ChildFailed:
        """Discard a broken child; log its exit; return the exception to raise."""
        status = self.reap(child, kill=kill)
        kind, phrase = classify_exit(status, killed_by_us=child.killed_by_us)
        message = f"{self.role} {child.pid} {why}; it {phrase}"
        if not timeout or self._timeouts_back_off:
            self.failures += 1
        if self.failures > FREE_RESTARTS:
            delay = min(BACKOFF_FIRST * 2 ** (self.failures - FREE_RESTARTS - 1), BACKOFF_MAX)
            self._not_before = time.monotonic() + delay
            message += f"; {self.failures} failures in a row, next start in {delay:.1f} s"
        self.log.error("%s", message)
        if kind is ExitKind.SANDBOX_VIOLATION:
            return SandboxViolation(message)
        if timeout:
            return ChildTimeout(message)
        return ChildFailed(message)

    def succeeded(self, child: RunningChild) -> None:
        """One exchange completed: the failure streak ends."""
        self.failures = 0
        child.requests += 1

    # --- one exchange ------------------------------------------------------------------
    def send(self, child: RunningChild, frame: memoryview, deadline: float, timeout: float) -> None:
        """Write all of *frame*, or fail the child.

        The child may be slow (a large request) but not silent: each wait for
        room in the pipe lasts at most *timeout*, and the whole write ends by
        *deadline*.
        """
        while frame:
            try:
                written = os.write(child.to_child, frame)
            except BlockingIOError:
                now = time.monotonic()
                left = min(deadline, now + timeout) - now
                if left <= 0 or not child.poll_out.poll(max(1, int(left * 1000))):
                    if time.monotonic() < min(deadline, now + timeout):
                        continue
                    raise self.failed(
                        child,
                        self._late(deadline, timeout, "did not read its request"),
                        kill=True,
                        timeout=True,
                    ) from None
                continue
            except BrokenPipeError:
                raise self.failed(child, "closed its request pipe", kill=False) from None
            frame = frame[written:]

    @staticmethod
    def _late(deadline: float, timeout: float, what: str) -> str:
        if time.monotonic() >= deadline:
            return f"{what} before its deadline"
        return f"{what} within {timeout:g} s"

    def receive_some(self, child: RunningChild, deadline: float, timeout: float) -> bytes:
        """The next bytes the child sends, or fail the child (EOF too).

        The child may go silent for at most *timeout*, and must be done by *deadline*.
        """
        waited_from = time.monotonic()
        while True:
            now = time.monotonic()
            until = min(deadline, waited_from + timeout)
            if now >= until or not child.poll_in.poll(max(1, int((until - now) * 1000))):
                if time.monotonic() < until:
                    continue
                raise self.failed(
                    child,
                    self._late(deadline, timeout, "sent no answer"),
                    kill=True,
                    timeout=True,
                )
            try:
                data = os.read(child.from_child, _READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError as err:
                raise self.failed(child, f"answer pipe failed: {err}", kill=True) from err
            if not data:
                raise self.failed(child, "closed its pipe in the middle of a request", kill=False)
            return data

    def read_idle(self, child: RunningChild) -> bytes | None:
        """What arrived while no request was out: None if nothing, b"" at EOF."""
        if not child.readable():
            return None
        try:
            return os.read(child.from_child, _READ_CHUNK)
        except BlockingIOError:
            return None
        except OSError:
            return b""
