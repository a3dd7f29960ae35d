"""The host side of the parser child: spawn it, talk to it, distrust it, restart it.

:class:`ParserChild` owns one ``python -m parserd`` process and its two pipes.
Every exchange has a deadline that really fires (the pipes are non-blocking
and every wait is a ``poll`` with the time left), and everything the child
sends is checked three times before it is believed: each frame against
:data:`~common.framing.MAX_RECORD_FRAME` before its body is read, each body
against the closed record schema, and the whole stream against the record
grammar (:class:`common.grammar.StreamChecker`, with the configured limits).
Any violation means the child is broken or compromised: it is killed and
reaped, :class:`~common.errors.ChildFailed` is raised, and the next request
starts a fresh child.  Bad data is never returned.

Restarts: a child is replaced after ``restart_after_requests`` requests or
``restart_after_cpu`` CPU seconds (its RLIMIT_CPU, a lifetime backstop that
cannot be reset under the filter, is twice that).  A child that keeps dying is
not restarted in a tight loop: after a few consecutive failures each restart
waits an exponentially growing, bounded time, and requests in that window fail
at once with a message saying so.

Facts we rely on:

* an unreaped child keeps its pid, so killing ``Popen.pid`` before
  ``wait()`` can never hit a recycled pid;
* a seccomp ``KILL_PROCESS`` shows as death by SIGSYS in the wait status;
* ``/proc/PID/stat`` fields 14 and 15 (after the ``comm`` field, which may
  contain spaces and parentheses) are user and system CPU time in clock ticks;
* Python ignores SIGPIPE, so writing to a dead child's pipe is ``EPIPE``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

import msgspec

from common.dof_abi import DOF_HELPER
from common.errors import (
    ChildFailed,
    ChildTimeout,
    ProtocolError,
    RequestRejected,
    SandboxViolation,
)
from common.framing import HEADER, HEADER_SIZE, MAX_RECORD_FRAME, FrameDecoder
from common.grammar import ParsedProbe, StreamChecker
from common.limits import ParseLimits
from common.records import Err, Log, ParserRecord, Provider, ResultRecord
from common.requests import ParseRequest

#: Log records one request may carry before the child counts as misbehaving.
MAX_LOG_RECORDS: Final = 64
#: Consecutive failures that restart at once; later ones back off.
FREE_RESTARTS: Final = 3
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 30.0
#: How long a child that closed its pipe gets to finish exiting before SIGKILL.
_EXIT_GRACE: Final = 1.0
_READ_CHUNK: Final = 1 << 20
#: Requests between two reads of the child's CPU time (a /proc read each).
_CPU_CHECK_EVERY: Final = 64
_F_SETPIPE_SZ: Final = 1031
_PIPE_SIZE: Final = 1 << 20  # fewer wake-ups for big DOF; best effort
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


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


def size_error(size: int, limits: ParseLimits) -> Err | None:
    """The Err the parser would send for a DOF over the size limit (checked before sending)."""
    if size <= limits.max_dof_size:
        return None
    return Err(errno=errno.E2BIG, message=f"data size {size} exceeds maximum {limits.max_dof_size}")


class _Running:
    """One live child and its parent-side pipe ends."""

    def __init__(self, proc: subprocess.Popen[bytes], to_child: int, from_child: int) -> None:
        self.proc = proc
        self.to_child = to_child
        self.from_child = from_child
        self.requests = 0
        self.started = time.monotonic()
        self.killed_by_us = False
        self.poll_in = select.poll()
        self.poll_in.register(from_child, select.POLLIN)
        self.poll_out = select.poll()
        self.poll_out.register(to_child, select.POLLOUT)

    def cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class ParserChild:
    """A sandboxed parser child, used one request at a time (thread-safe)."""

    def __init__(
        self,
        *,
        limits: ParseLimits,
        timeout: float,
        sandbox: bool = True,
        log: logging.Logger | None = None,
        restart_after_requests: int = 10000,
        restart_after_cpu: float = 600.0,
        command: Sequence[str] | None = None,
    ) -> None:
        """*command* replaces the child's argv (default: this interpreter running
        ``parserd`` with the limits); it lets a debugger or ``strace`` wrap the child."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.limits = limits
        self.timeout = timeout
        self.sandbox = sandbox
        self.log = log or logging.getLogger("dtprobed.parser")
        self.restart_after_requests = restart_after_requests
        self.restart_after_cpu = restart_after_cpu
        self._command = list(command) if command is not None else None
        self._lock = threading.Lock()
        self._child: _Running | None = None
        self._failures = 0
        self._not_before = 0.0
        self._decoder: FrameDecoder[list[ParserRecord]] = FrameDecoder(
            list[ParserRecord], MAX_RECORD_FRAME
        )
        self._encoder = msgspec.msgpack.Encoder()

    # --- lifecycle ----------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        child = self._child
        return child.proc.pid if child is not None else None

    def argv(self) -> list[str]:
        if self._command is not None:
            return list(self._command)
        lim = self.limits
        argv = [sys.executable, "-I", "-m", "parserd"]
        if not self.sandbox:
            argv.append("--no-sandbox")
        argv += [
            f"--max-dof-size={lim.max_dof_size}",
            f"--max-providers={lim.max_providers}",
            f"--max-probes={lim.max_probes}",
            f"--max-tracepoints={lim.max_tracepoints}",
            f"--cpu-limit={max(1, int(2 * self.restart_after_cpu))}",
        ]
        return argv

    def start(self) -> None:
        """Start the child now (otherwise the first :meth:`parse` does)."""
        with self._lock:
            if self._child is None:
                self._start()

    def stop(self) -> None:
        """Close the request pipe, give the child a moment to exit, then kill it."""
        with self._lock:
            if self._child is not None:
                self._stop_gracefully("stopping")

    def _start(self) -> None:
        now = time.monotonic()
        if now < self._not_before:
            raise ChildFailed(
                f"parser child failed {self._failures} times in a row; "
                f"not restarting it for another {self._not_before - now:.1f} s"
            )
        req_r, req_w = os.pipe()
        rec_r, rec_w = os.pipe()
        try:
            for fd in (req_w, rec_w):
                # over /proc/sys/fs/pipe-max-size for unprivileged users: keep 64 KiB
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
            proc = subprocess.Popen(self.argv(), stdin=req_r, stdout=rec_w, close_fds=True, cwd="/")
        except BaseException:
            for fd in (req_r, req_w, rec_r, rec_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(rec_w)
        os.set_blocking(req_w, False)
        os.set_blocking(rec_r, False)
        self._child = _Running(proc, req_w, rec_r)
        self.log.debug("parser child %d started: %s", proc.pid, " ".join(self.argv()))

    def _close_pipes(self, child: _Running) -> None:
        for fd in (child.to_child, child.from_child):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _reap(self, child: _Running, *, kill: bool, grace: float = _EXIT_GRACE) -> int:
        """Kill (if asked or if it outlives *grace*), reap, close; the child is forgotten."""
        self._child = None
        if kill and child.proc.poll() is None:
            child.killed_by_us = True
            child.proc.kill()
        self._close_pipes(child)  # after the kill: a closed fd 0 would let it exit 0 first
        try:
            return child.proc.wait(grace)
        except subprocess.TimeoutExpired:
            child.killed_by_us = True
            child.proc.kill()
            return child.proc.wait()

    def _stop_gracefully(self, why: str) -> None:
        child = self._child
        assert child is not None
        status = self._reap(child, kill=False)  # closing fd 0 makes it exit(0)
        kind, phrase = classify_exit(status, killed_by_us=child.killed_by_us)
        level = logging.DEBUG if kind is ExitKind.CLEAN else logging.WARNING
        self.log.log(level, "parser child %d %s (%s)", child.proc.pid, phrase, why)

    def _failed(
        self, child: _Running, why: str, *, kill: bool, timeout: bool = False
    ) -> ChildFailed:
        """Discard a broken child; log its exit; return the exception to raise."""
        status = self._reap(child, kill=kill)
        kind, phrase = classify_exit(status, killed_by_us=child.killed_by_us)
        pid = child.proc.pid
        message = f"parser child {pid} {why}; it {phrase}"
        self._failures += 1
        if self._failures > FREE_RESTARTS:
            delay = min(BACKOFF_FIRST * 2 ** (self._failures - FREE_RESTARTS - 1), BACKOFF_MAX)
            self._not_before = time.monotonic() + delay
            message += f"; {self._failures} failures in a row, next start in {delay:.1f} s"
        self.log.error("%s", message)
        if kind is ExitKind.SANDBOX_VIOLATION:
            return SandboxViolation(message)
        if timeout:
            return ChildTimeout(message)
        return ChildFailed(message)

    # --- one exchange ----------------------------------------------------------------
    def parse(
        self, helper: bytes, dof: bytes, *, meanwhile: Callable[[], object] | None = None
    ) -> list[ParsedProbe]:
        """Parse one DOF in the child.

        Returns the probes of an accepted DOF; raises :class:`RequestRejected`
        when the parser refused it, :class:`ChildFailed` (or its subclasses
        :class:`ChildTimeout`, :class:`SandboxViolation`) when the child broke.

        *meanwhile* runs in this thread once the request is on its way, while
        the child parses (the receiver reads /proc then).  The answer is still
        read in full whatever it does, so the child stays in step; an
        exception from *meanwhile* is raised after that, unless the child broke.
        """
        checker = self._run(helper, dof, meanwhile)
        if checker.error is not None:
            raise RequestRejected(checker.error.errno, checker.error.message)
        return checker.probes

    def parse_records(self, helper: bytes, dof: bytes) -> list[ResultRecord]:
        """The checked record stream (ending in Eof or Err), for tools that print it."""
        return self._run(helper, dof).records

    def _run(
        self, helper: bytes, dof: bytes, meanwhile: Callable[[], object] | None = None
    ) -> _Checked:
        if len(helper) != DOF_HELPER.size:
            raise ValueError(f"dof_helper_t is {DOF_HELPER.size} bytes, got {len(helper)}")
        too_big = size_error(len(dof), self.limits)
        if too_big is not None:
            if meanwhile is not None:
                meanwhile()
            return _Checked.from_records([too_big], self.limits)
        body = bytearray(HEADER_SIZE)
        self._encoder.encode_into(ParseRequest(helper=helper, dof=dof), body, HEADER_SIZE)
        HEADER.pack_into(body, 0, len(body) - HEADER_SIZE)
        with self._lock:
            child = self._ready_child()
            result = self._exchange(child, memoryview(body), meanwhile)
            self._failures = 0
            child.requests += 1
            if child.requests >= self.restart_after_requests:
                self._stop_gracefully(f"scheduled restart after {child.requests} requests")
            elif (
                child.requests % _CPU_CHECK_EVERY == 0
                and (cpu := child.cpu_seconds()) >= self.restart_after_cpu
            ):
                self._stop_gracefully(f"scheduled restart after {cpu:.0f} CPU seconds")
            return result

    def _ready_child(self) -> _Running:
        """The live child, after checking that nothing arrived since the last request."""
        child = self._child
        if child is not None:
            try:
                self._drain_idle(child)
            except ChildFailed as err:
                self.log.warning("%s", err)
                child = None
        if child is None:
            self._start()
            child = self._child
            assert child is not None
        return child

    def _drain_idle(self, child: _Running) -> None:
        """Between requests only Log records may arrive; EOF means the child died idle."""
        pending = bytearray()
        while child.poll_in.poll(0):
            data = self._read_some(child)
            if data is None:
                break
            if not data:
                raise self._failed(child, "closed its pipe between requests", kill=False)
            pending += data
            try:
                batches, used = self._decoder.split(pending)
            except ProtocolError as err:
                raise self._failed(child, f"sent a bad frame: {err}", kill=True) from err
            del pending[:used]
            for batch in batches:
                for rec in batch:
                    if not isinstance(rec, Log):
                        raise self._failed(
                            child, f"sent {type(rec).__name__} between requests", kill=True
                        )
                    self._emit(rec)
        if pending:
            raise self._failed(child, "left a partial frame between requests", kill=True)

    def _read_some(self, child: _Running) -> bytes | None:
        """What the pipe holds now: None if nothing (spurious wake-up), b"" at EOF."""
        try:
            return os.read(child.from_child, _READ_CHUNK)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _exchange(
        self,
        child: _Running,
        frame: memoryview,
        meanwhile: Callable[[], object] | None = None,
    ) -> _Checked:
        deadline = time.monotonic() + self.timeout
        self._send(child, frame, deadline)
        side_error: BaseException | None = None
        if meanwhile is not None:
            try:
                meanwhile()
            except Exception as err:
                side_error = err
        checked = self._receive(child, deadline)
        if side_error is not None:
            raise side_error
        return checked

    def _receive(self, child: _Running, deadline: float) -> _Checked:
        checked = _Checked(self.limits)
        pending = bytearray()
        while not checked.done:
            left = deadline - time.monotonic()
            if left <= 0 or not child.poll_in.poll(max(1, int(left * 1000))):
                if time.monotonic() < deadline:
                    continue
                raise self._failed(
                    child, f"sent no answer within {self.timeout:g} s", kill=True, timeout=True
                )
            try:
                data = os.read(child.from_child, _READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError as err:
                raise self._failed(child, f"record pipe failed: {err}", kill=True) from err
            if not data:
                raise self._failed(child, "closed its pipe in the middle of a request", kill=False)
            pending += data
            try:
                batches, used = self._decoder.split(pending)
                del pending[:used]
                for batch in batches:
                    checked.feed_batch(batch, self._emit)
                if checked.done and pending:
                    raise ProtocolError("bytes after the end of the stream")
            except ProtocolError as err:
                raise self._failed(child, f"broke the protocol: {err}", kill=True) from err
        return checked

    def _send(self, child: _Running, frame: memoryview, deadline: float) -> None:
        while frame:
            try:
                written = os.write(child.to_child, frame)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._failed(
                        child,
                        f"did not read its request within {self.timeout:g} s",
                        kill=True,
                        timeout=True,
                    ) from None
                child.poll_out.poll(max(1, int(left * 1000)))
                continue
            except BrokenPipeError:
                raise self._failed(child, "closed its request pipe", kill=False) from None
            frame = frame[written:]

    def _emit(self, rec: Log) -> None:
        level = rec.level if rec.level > 0 else logging.DEBUG
        self.log.log(level, "parser: %s", rec.message.encode("unicode_escape").decode("ascii"))


class _Checked:
    """The stream of one request as it passes the grammar and the provider limit."""

    def __init__(self, limits: ParseLimits) -> None:
        self._checker = StreamChecker(
            max_probes=limits.max_probes, max_tracepoints=limits.max_tracepoints
        )
        self._max_providers = limits.max_providers
        self.records: list[ResultRecord] = []
        self.providers = 0
        self.logs = 0

    @classmethod
    def from_records(cls, records: list[ResultRecord], limits: ParseLimits) -> _Checked:
        checked = cls(limits)
        for rec in records:
            checked.feed(rec)
        return checked

    @property
    def done(self) -> bool:
        return self._checker.done

    @property
    def error(self) -> Err | None:
        return self._checker.error

    @property
    def probes(self) -> list[ParsedProbe]:
        return self._checker.probes

    def feed(self, rec: ResultRecord) -> None:
        self.feed_batch([rec], _no_log)

    def feed_batch(self, batch: list[ParserRecord], on_log: Callable[[Log], None]) -> None:
        """Check a batch record by record (the hot loop: 2000 probes are ~6000 records)."""
        checker = self._checker
        feed = checker.feed
        append = self.records.append
        for rec in batch:
            kind = type(rec)
            if kind is Log:
                if checker.done:
                    raise ProtocolError("Log record after the end of the stream")
                self.logs += 1
                if self.logs > MAX_LOG_RECORDS:
                    raise ProtocolError(f"more than {MAX_LOG_RECORDS} Log records")
                on_log(rec)  # type: ignore[arg-type]
                continue
            feed(rec)  # type: ignore[arg-type]  # after the end record: "expected nothing"
            append(rec)  # type: ignore[arg-type]
            if kind is Provider:
                self.providers += 1
                if self.providers > self._max_providers:
                    raise ProtocolError(f"more than {self._max_providers} providers")


def _no_log(rec: Log) -> None:
    raise ProtocolError("Log record where none may be")
