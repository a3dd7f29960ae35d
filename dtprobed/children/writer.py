"""Host side of the stash writer child: :class:`StashWriterChild`.

The daemon never writes under the state directory itself; it sends one
command at a time to the writer child (:mod:`dtprobed.stash.writer`) and
waits for the one reply.  *timeout* (``-t``) bounds how long the writer may
go **silent**: while it works on a long command it sends ``Progress`` frames,
each of which restarts that window, and the whole command is bounded only by
*backstop* (generous: far beyond any commit the quotas admit).

Two kinds of failure, told apart because only one of them may stop the daemon:

* **The writer cannot start** — it exits before its ``Started`` frame (lock
  held, unusable state directory), or its start-up recovery goes silent for
  *timeout* (or exceeds *start_backstop*): :class:`ChildFailed` is raised
  and counts towards the slot's back-off; the daemon's receiver gives up
  (exit 2) after several in a row.  Start-up recovery and the index rebuild
  are not bounded by *timeout* as a whole: they report progress too.
* **One command fails** — the writer times out, dies or breaks the protocol
  while working on it: the writer is killed and reaped, the command fails
  with :class:`WriterCommandFailed` (a :class:`StashError`, ``errno``
  ``ETIMEDOUT`` for a timeout, else ``EIO``), and the next call starts a
  new writer, which recovers the tree first.  This is the fate of one
  client's request, not of the daemon: it neither counts towards the
  back-off nor raises :class:`ChildFailed`, so no number of hostile
  requests makes the daemon exit.

A ``Failure`` reply raises :class:`StashError` with the writer's errno.  The writer's log lines arrive as ``Log`` frames
before a reply (or, from start-up recovery, before the first one) and are
logged here, bounded, into this object's logger (the daemon's
``dtprobed.stash``); DEBUG lines are sent only when that logger is enabled
for DEBUG when the writer starts (``--debug``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from common.errors import ChildFailed, ChildTimeout, ProtocolError, StashError
from common.framing import FrameDecoder, FrameEncoder
from common.grammar import ParsedProbe
from common.records import Eof, ResultRecord
from common.stash_protocol import (
    MAX_LOG_RECORDS,
    MAX_REPLY_FRAME,
    PRIORITY_MAX_RECORDS,
    Busy,
    Command,
    Deferred,
    Done,
    Failure,
    Generation,
    Items,
    Log,
    Pids,
    Problems,
    Progress,
    PruneDead,
    Register,
    Registration,
    Remove,
    Removed,
    RemovePid,
    ReparseItem,
    ReparseScan,
    Started,
    StashQuotas,
    StashReply,
    Verify,
    WriteReparsed,
    Yield,
    quota_argv,
)
from dtprobed.children.process import ChildSlot, PriorityChannel, RunningChild

#: An exit prune waits at most this long for the registrations waiting for the main pipe
#: (before it starts, and after it gave way to one): under a flood of large registrations
#: it still runs.
PRUNE_YIELDS_FOR: Final = 1.0
#: Default bound on one whole command of a writer that keeps reporting progress.
DEFAULT_BACKSTOP: Final = 300.0
#: Default bound on a writer's whole start-up (recovery + index) while it reports progress.
DEFAULT_START_BACKSTOP: Final = 3600.0
#: The writer reports progress this often (or more, for a small ``-t``).
PROGRESS_INTERVAL: Final = 0.25
#: Silence allowed before a new writer's first frame (the interpreter starting and
#: importing: no progress can be reported yet), when -t is shorter.
START_GRACE: Final = 10.0
#: While waiting for a writer's start-up, its progress is logged (INFO) this often.
START_LOG_INTERVAL: Final = 5.0


class WriterCommandFailed(StashError):
    """The writer broke (timed out, died, broke the protocol) working on one command.

    That command failed and changed nothing (the next writer's start-up
    recovery rolls back whatever it had begun); the writer was replaced.
    """


def probes_to_records(probes: Sequence[ParsedProbe]) -> list[ResultRecord]:
    """The record stream for grouped probes: each PROVIDER, then its ``nprobes`` probes.

    The writer re-checks the stream, so probes that do not add up to their
    provider's ``nprobes`` are refused there, not papered over here.
    """
    out: list[ResultRecord] = []
    remaining = 0
    for p in probes:
        if remaining <= 0:
            out.append(p.provider)
            remaining = p.provider.nprobes
        out.append(p.probe)
        out.extend(p.args)
        out.extend(p.tracepoints)
        remaining -= 1
    out.append(Eof())
    return out


class StashWriterChild:
    """One writer child; thread-safe (one command at a time)."""

    def __init__(
        self,
        state_dir: str,
        *,
        timeout: float,
        quotas: StashQuotas | None = None,
        log: logging.Logger | None = None,
        backstop: float = DEFAULT_BACKSTOP,
        start_backstop: float = DEFAULT_START_BACKSTOP,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        """*on_progress* is called (on the calling thread) for every frame the writer
        sends, e.g. to keep a watchdog fed while a long start-up advances."""
        self.state_dir = state_dir
        self.timeout = timeout
        self.backstop = max(backstop, timeout)
        self.start_backstop = max(start_backstop, timeout)
        self.on_progress = on_progress
        self.started: Started | None = None  # what the current writer's Started said
        self.quotas = quotas if quotas is not None else StashQuotas()
        self.log = log if log is not None else logging.getLogger("dtprobed.stash_client")
        self._lock = threading.Lock()
        self._slot = ChildSlot("stash writer", self.argv, self.log, priority_channel=True)
        self._encoder = FrameEncoder()
        # the priority channel: one exchange at a time, beside the main one
        self._priority_lock = threading.Lock()
        self._priority_encoder = FrameEncoder()
        self._priority_decoder: FrameDecoder[StashReply] = FrameDecoder(StashReply, MAX_REPLY_FRAME)
        self.priority_answered = 0  # commands the priority channel answered (not Busy)
        self._decoder: FrameDecoder[StashReply] = FrameDecoder(StashReply, MAX_REPLY_FRAME)
        self._pending = bytearray()  # bytes of the current child not yet decoded
        self._logs = 0  # Log frames since its last reply
        # an exit prune on the main pipe gives way to a registration (remove_pid)
        self._main_deferrable = False  # the main pipe holds a RemovePid that may defer
        self._preempt = threading.Condition()
        self._registers_waiting = 0  # Registers waiting for the main pipe (exit prunes yield)
        self.removals_deferred = 0

    @property
    def pid(self) -> int | None:
        return self._slot.pid

    @property
    def progress_interval(self) -> float:
        """How often the writer reports advancing work: well inside the silence window."""
        return min(PROGRESS_INTERVAL, self.timeout / 4)

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-I",
            "-m",
            "dtprobed.stash.writer",
            "--state-dir",
            os.path.abspath(self.state_dir),
            *quota_argv(self.quotas),
            f"--progress-interval={self.progress_interval:g}",
            # DEBUG lines cross the pipe only when the daemon would log them (-d)
            *(["--debug"] if self.log.isEnabledFor(logging.DEBUG) else []),
        ]

    def start(self) -> None:
        with self._lock:
            self._ready_child()

    def stop(self) -> None:
        with self._lock:
            self._slot.stop("stopping")

    def _ready_child(self) -> RunningChild:
        """The live writer; one that died between commands is reported and replaced.

        No command was in flight, so none fails: the next one goes to a new writer.
        Before its first reply a writer may send the log lines of its start-up
        recovery; they are forwarded here (or during the first exchange).
        """
        child = self._slot.child
        while child is not None:
            idle = self._slot.read_idle(child)
            if idle is None:
                break
            if idle == b"":
                self._drain_logs(child)
                self._slot.failed(child, "died between commands", kill=False)
                child = None
                break
            self._pending += idle
            try:
                frames, used = self._decoder.split(self._pending)
                del self._pending[:used]
                for frame in frames:
                    if not isinstance(frame, Log) or child.requests:
                        raise ProtocolError("sent bytes between commands")
                    self._log_line(child, frame)
            except ProtocolError as err:
                self._slot.failed(child, f"broke the protocol: {err}", kill=True)
                child = None
        if child is None:
            child = self._slot.start()
            self._pending = bytearray()
            self._logs = 0
            self._await_started(child)
        return child

    def _await_started(self, child: RunningChild) -> None:
        """Wait for the new writer's ``Started``: silence bounded by -t, the whole by the
        start backstop.  Its failure is a start failure (:class:`ChildFailed`, back-off)."""
        begun = time.monotonic()
        deadline = begun + self.start_backstop
        next_log = begun + START_LOG_INTERVAL
        pending = self._pending
        self.started = None
        silence = max(self.timeout, START_GRACE)  # until its first frame
        while self.started is None:
            try:
                data = self._slot.receive_some(child, deadline, silence)
                silence = self.timeout
            except ChildFailed:
                self._drain_logs(child)  # e.g. "cannot start: …" before it exited
                raise
            pending += data
            try:
                frames, used = self._decoder.split(pending)
                del pending[:used]
                for i, item in enumerate(frames):
                    if isinstance(item, Log):
                        self._log_line(child, item)
                    elif isinstance(item, Progress):
                        now = time.monotonic()
                        if now >= next_log:
                            next_log = now + START_LOG_INTERVAL
                            self.log.info(
                                "stash writer %d: starting: %s, %d done (%.0f s)",
                                child.pid,
                                item.what or "working",
                                item.done,
                                now - begun,
                            )
                    elif isinstance(item, Started) and i == len(frames) - 1 and not pending:
                        self.started = item  # ends the loop
                        elapsed = time.monotonic() - begun
                        level = logging.INFO if elapsed >= 1 else logging.DEBUG
                        self.log.log(
                            level,
                            "stash writer %d: started in %.1f s: %d processes, %d probes, "
                            "%d raw bytes",
                            child.pid,
                            elapsed,
                            item.pids,
                            item.probes,
                            item.raw_bytes,
                        )
                    else:
                        raise ProtocolError(f"sent {type(item).__name__} before Started")
            except ProtocolError as err:
                raise self._slot.failed(child, f"broke the protocol: {err}", kill=True) from err
            if self.on_progress is not None:
                self.on_progress()
        # a writer that starts is a working role again: no back-off is owed
        self._slot.failures = 0
        self._logs = 0

    def _log_line(self, child: RunningChild, rec: Log) -> None:
        """One writer log line into the daemon's log; too many is a protocol violation."""
        self._logs += 1
        budget = (MAX_LOG_RECORDS + 1) * (2 if child.requests == 0 else 1)  # + start-up
        if self._logs > budget:
            raise ProtocolError(f"more than {budget} Log frames before one reply")
        text = rec.message.encode("unicode_escape").decode("ascii")
        self.log.log(rec.level, "stash writer %d: %s", child.pid, text)

    def _drain_logs(self, child: RunningChild) -> None:
        """Log what complete Log frames a dead writer left (its last words); ignore the rest."""
        try:
            frames, _ = self._decoder.split(self._pending)
        except ProtocolError:
            return
        for frame in frames:
            if isinstance(frame, Log):
                self.log.log(
                    frame.level,
                    "stash writer %d: %s",
                    child.pid,
                    frame.message.encode("unicode_escape").decode("ascii"),
                )

    # --------------------------------------------------------------- exchange

    def _exchange(self, command: Command, *, counted: bool = False) -> StashReply:
        with self._main_pipe(command, counted):
            child = self._ready_child()  # ChildFailed here: the writer cannot start
            frame = self._encoder.encode(command)
            self._main_deferrable = isinstance(command, RemovePid) and command.may_defer
            try:
                return self._command(child, memoryview(frame))
            except ChildFailed as err:
                # this command's failure, not the role's (module docstring)
                self._slot.failures = 0
                del frame
                code = errno.ETIMEDOUT if isinstance(err, ChildTimeout) else errno.EIO
                raise WriterCommandFailed(
                    type(command).__name__, "stash writer", code, str(err)
                ) from err
            finally:
                self._main_deferrable = False

    def _command(self, child: RunningChild, frame: memoryview) -> StashReply:
        """Send one command, wait for its reply: silence bounded by -t, the whole by the
        backstop; Log and Progress frames before the reply."""
        deadline = time.monotonic() + self.backstop
        self._slot.send(child, frame, deadline, self.timeout)
        pending = self._pending
        while True:
            try:
                data = self._slot.receive_some(child, deadline, self.timeout)
            except ChildFailed:
                self._drain_logs(child)
                raise
            pending += data
            try:
                frames, used = self._decoder.split(pending)
                del pending[:used]
                reply = None
                for i, item in enumerate(frames):
                    if isinstance(item, Log):
                        self._log_line(child, item)
                    elif isinstance(item, Progress):
                        continue
                    elif isinstance(item, Started):
                        raise ProtocolError("sent Started twice")
                    elif i != len(frames) - 1 or pending:
                        raise ProtocolError("more than one reply to one command")
                    else:
                        reply = item
            except ProtocolError as err:
                raise self._slot.failed(child, f"broke the protocol: {err}", kill=True) from err
            if self.on_progress is not None:
                self.on_progress()
            if reply is not None:
                self._slot.succeeded(child)
                self._logs = 0
                return reply

    # --------------------------------------------------------------- priority channel

    @staticmethod
    def _may_overtake(command: Command) -> bool:
        """Small enough for the priority channel (the writer checks again)."""
        if isinstance(command, Register):
            return len(command.records) <= PRIORITY_MAX_RECORDS
        return isinstance(command, (Remove, RemovePid))

    def _priority_exchange(self, command: Command) -> StashReply | None:
        """*command* on the priority channel; None if not taken (no channel, ``Busy``).

        Used only while another thread's command holds the main channel, i.e.
        the writer is working on it: the writer answers at its next yield point
        (a long Register or RemovePid of another process), or right after that
        command.  A writer that dies or breaks the protocol here fails this
        command only; the main channel's user (or the next command) replaces it.
        """
        child = self._slot.child
        channel = child.priority if child is not None else None
        if child is None or channel is None:
            return None
        with self._priority_lock, channel.lock:
            if channel.closed:
                return None
            deadline = time.monotonic() + self.backstop
            try:
                self._priority_send(channel, self._priority_encoder.encode(command), deadline)
                return self._priority_reply(child, channel, deadline)
            except (OSError, ProtocolError, TimeoutError) as err:
                if isinstance(err, ProtocolError):
                    child.proc.kill()  # broken: the main channel's next exchange reaps it
                raise WriterCommandFailed(
                    type(command).__name__, "stash writer", errno.EIO, f"priority channel: {err}"
                ) from err

    @staticmethod
    def _priority_send(channel: PriorityChannel, frame: bytes, deadline: float) -> None:
        view = memoryview(frame)
        while view:
            try:
                view = view[os.write(channel.to_child, view) :]
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the writer did not read its priority command") from None
                channel.poll_out.poll(max(1, int(left * 1000)))

    def _priority_reply(
        self, child: RunningChild, channel: PriorityChannel, deadline: float
    ) -> StashReply | None:
        pending = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer on the priority channel before the backstop")
            if not channel.poll_in.poll(max(1, int(left * 1000))):
                continue
            try:
                data = os.read(channel.from_child, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                raise OSError(errno.EPIPE, "the writer closed its priority channel")
            pending += data
            frames, used = self._priority_decoder.split(pending)
            del pending[:used]
            for i, item in enumerate(frames):
                if isinstance(item, Log):
                    self.log.log(
                        item.level,
                        "stash writer %d: %s",
                        child.pid,
                        item.message.encode("unicode_escape").decode("ascii"),
                    )
                elif isinstance(item, Progress):
                    continue
                elif isinstance(item, Started) or i != len(frames) - 1 or pending:
                    raise ProtocolError("priority channel: more than one reply to one command")
                elif isinstance(item, Busy):
                    return None
                else:
                    self.priority_answered += 1
                    return item

    @contextlib.contextmanager
    def _main_pipe(self, command: Command, counted: bool) -> Iterator[None]:
        """Hold the main pipe for *command*.  A ``Register`` counts as waiting for it
        until it has it (*counted*: the caller counted it already), and exit prunes let
        those go first (:meth:`remove_pid`)."""
        if not isinstance(command, Register):
            with self._lock:
                yield
            return
        if not counted:
            self._count_waiting(1)
        try:
            self._lock.acquire()
        finally:
            self._count_waiting(-1)
        try:
            yield
        finally:
            self._lock.release()

    def _count_waiting(self, delta: int) -> None:
        with self._preempt:
            self._registers_waiting += delta
            self._preempt.notify_all()

    def _let_registrations_go_first(self) -> None:
        with self._preempt:
            self._preempt.wait_for(lambda: self._registers_waiting == 0, timeout=PRUNE_YIELDS_FOR)

    def _preempting_exchange(self, command: Register) -> StashReply:
        """A Register too large for the priority channel, while an exit prune holds the
        main pipe: ask it to give way (``Yield``), then take the main pipe before the
        prune's rest (:meth:`remove_pid` waits for this)."""
        self._count_waiting(1)  # before the Yield: the prune's rest waits for it from then
        try:
            self._priority_exchange(Yield())  # Done; None without a channel
        except StashError as err:  # the writer broke: the main exchange will tell
            self.log.debug("Yield not delivered: %s", err)
        except BaseException:
            self._count_waiting(-1)
            raise
        return self._exchange(command, counted=True)

    def _call(
        self, command: Command, expected: type | tuple[type, ...], *, priority: bool = True
    ) -> StashReply:
        reply: StashReply | None = None
        if priority and self._lock.locked():
            if self._may_overtake(command):
                reply = self._priority_exchange(command)
            elif isinstance(command, Register) and self._main_deferrable:
                reply = self._preempting_exchange(command)
        if reply is None:
            reply = self._exchange(command)
        if isinstance(reply, Failure):
            raise StashError(type(command).__name__, "stash", reply.errno, reply.message)
        if not isinstance(reply, expected):
            with self._lock:
                child = self._slot.child
                if child is not None:
                    self._slot.failed(child, "answered out of protocol", kill=True)
            raise ChildFailed(
                f"stash writer answered {type(reply).__name__} to {type(command).__name__}"
            )
        return reply

    # --------------------------------------------------------------- operations

    def register(self, reg: Registration, probes: list[ParsedProbe]) -> int:
        return self.register_records(reg, probes_to_records(probes))

    def register_records(self, reg: Registration, records: list[ResultRecord]) -> int:
        """Register the record stream the parser sent (``… EOF``) as it is."""
        reply = self._call(Register(reg=reg, records=records), Generation)
        assert isinstance(reply, Generation)
        return reply.gen

    def remove(self, pid: int, gen: int) -> bool:
        """True when that generation existed (and is gone now)."""
        reply = self._call(Remove(pid=pid, gen=gen), Removed)
        assert isinstance(reply, Removed)
        return reply.existed

    def remove_pid(self, pid: int, *, may_defer: bool = False) -> None:
        """Every generation of *pid*.  *may_defer* (an exit prune: no client waits for
        it): it goes on the main pipe only, after the registrations waiting for it (at
        most PRUNE_YIELDS_FOR), and a large registration that comes meanwhile has the
        writer first: the prune's generations are gone at once, the rest of its files
        after that registration."""
        if may_defer:
            self._let_registrations_go_first()
        # an exit prune is background work: the main pipe only, never inside a registration
        reply = self._call(
            RemovePid(pid=pid, may_defer=may_defer), (Done, Deferred), priority=not may_defer
        )
        if isinstance(reply, Deferred):
            self.removals_deferred += 1
            self._let_registrations_go_first()
            # the main pipe only: on the priority channel it would run inside that registration
            self._call(RemovePid(pid=pid), Done, priority=False)

    def prune_dead(self) -> list[int]:
        reply = self._call(PruneDead(), Pids)
        assert isinstance(reply, Pids)
        return list(reply.pids)

    def reparse_scan(self, force: bool) -> list[ReparseItem]:
        items: list[ReparseItem] = []
        offset: int | None = 0
        while offset is not None:
            reply = self._call(ReparseScan(force=force, offset=offset), Items)
            assert isinstance(reply, Items)
            items.extend(reply.items)
            if reply.next_offset is not None and reply.next_offset <= offset:
                raise ChildFailed("stash writer's reparse scan did not advance")
            offset = reply.next_offset
        return items

    def write_reparsed(self, item: ReparseItem, probes: list[ParsedProbe] | None) -> None:
        self.write_reparsed_records(item, None if probes is None else probes_to_records(probes))

    def write_reparsed_records(self, item: ReparseItem, records: list[ResultRecord] | None) -> None:
        """Replace one mapping's parsed files with the parser's stream (None: parse failed)."""
        self._call(WriteReparsed(item=item, records=records), Done)

    def verify(self) -> list[str]:
        reply = self._call(Verify(), Problems)
        assert isinstance(reply, Problems)
        return list(reply.problems)


__all__ = ["StashWriterChild", "WriterCommandFailed", "probes_to_records"]
