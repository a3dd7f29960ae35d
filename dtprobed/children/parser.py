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
cannot be reset under the filter, is twice that).  Starting, deadlines,
reaping, exit classification and back-off are :mod:`dtprobed.children.process`'s.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final, NamedTuple, Protocol

import msgspec

from common.dof_abi import DOF_HELPER, DTRACE_MODNAMELEN
from common.errors import (
    ChildFailed,
    ProtocolError,
    RequestRejected,
)
from common.framing import HEADER, HEADER_SIZE, MAX_RECORD_FRAME, FrameDecoder, FrameEncoder
from common.grammar import ParsedProbe, StreamChecker
from common.limits import ParseLimits
from common.records import (
    Err,
    Log,
    NotesLocation,
    ParserRecord,
    ReadAt,
    ResultRecord,
    Tracepoint,
)
from common.requests import LocateNotes, ObjectBytes, ParseNoteBlocks, ParseRequest, ParserRequest
from dtprobed.children.parsecache import (
    ParseCache,
    dof_key,
    locate_key,
    notes_key,
    read_digest,
)
from dtprobed.children.process import ChildSlot, RunningChild

#: ``read(offset, size)``: the object's bytes there (shorter only at its end).
ReadFn = Callable[[int, int], bytes]

#: Log records one request may carry before the child counts as misbehaving.
MAX_LOG_RECORDS: Final = 64
#: A batch of at least this many records is followed by a GIL hand-over (sleep(0)).
_YIELD_AFTER_RECORDS: Final = 512
#: Requests between two reads of the child's CPU time (a /proc read each).
_CPU_CHECK_EVERY: Final = 64
#: The backstop of one exchange: this many timeouts, plus one per this many request
#: bytes (a hostile 256 MiB DOF parses in seconds; the child must never go silent
#: for longer than one timeout whatever the backstop).
_BACKSTOP_TIMEOUTS: Final = 8
_BYTES_PER_TIMEOUT: Final = 1 << 20


class ParseResult(NamedTuple):
    """An accepted parse: the checked record stream (ending in ``Eof``) and its probes.

    The stream goes to the stash writer as it is (the writer checks it again);
    ``probes`` is the same stream grouped per probe, as the grammar check built it.
    """

    records: list[ResultRecord]
    probes: list[ParsedProbe]

    def tracepoint_addrs(self) -> Iterator[int]:
        return (rec.addr for rec in self.records if type(rec) is Tracepoint)


class NotesObject(NamedTuple):
    """An ELF object's notes as a HASUSDT registration parses and stores them."""

    helper: bytes  # dofhp_mod = the module, dofhp_addr = the load base, dofhp_dof = 0
    where: NotesLocation
    notes: bytes  # the whole .note.usdt, read once: raw block 0
    rodata: bytes  # the whole .rodata: raw block 1
    result: ParseResult


def notes_helper(module: str, load_addr: int) -> bytes:
    """The ``dof_helper_t`` of an object, as upstream 2.0.7 builds it (zeros after the name)."""
    name = module.encode("utf-8", "surrogateescape")[: DTRACE_MODNAMELEN - 1]
    return DOF_HELPER.pack(name.ljust(DTRACE_MODNAMELEN, b"\0"), load_addr, 0)


class NotesParser(Protocol):
    """What :func:`parse_object_notes` needs of a parser (:class:`ParserChild` has it)."""

    def locate_notes(
        self, helper: bytes, size: int, read: ReadFn, *, requester: int | None = None
    ) -> NotesLocation: ...
    def parse_note_blocks(
        self,
        helper: bytes,
        notes_addr: int,
        notes: bytes,
        rodata_addr: int,
        rodata: bytes,
        *,
        requester: int | None = None,
    ) -> ParseResult: ...


def parse_object_notes(
    locator: NotesParser,
    parser_for: Callable[[int], NotesParser],
    module: str,
    first_mapping: int,
    size: int,
    read: ReadFn,
    *,
    requester: int | None = None,
) -> NotesObject:
    """Locate (in *locator*), read once, and parse (in ``parser_for(block bytes)``) an object.

    The child interprets the object; *read* answers its ``ReadAt`` and then reads
    the two sections it located.  Raises :class:`RequestRejected` when the parser
    refused the object or the file shrank while it was read.  *requester*: see
    :meth:`ParserChild.parse_result` (the parse of the blocks may come from the cache).
    """
    helper = notes_helper(module, first_mapping)
    if requester is None:
        where = locator.locate_notes(helper, size, read)
    else:
        where = locator.locate_notes(helper, size, read, requester=requester)
    notes = read(where.notes_offset, where.notes_size)
    rodata = read(where.rodata_offset, where.rodata_size)
    if len(notes) != where.notes_size or len(rodata) != where.rodata_size:
        raise RequestRejected(errno.EINVAL, f"object {module} shrank while it was read")
    # dofhp_addr is the load base as upstream stores it: the first mapping of an
    # ET_DYN object, 0 for ET_EXEC (the parser told which)
    helper = notes_helper(module, where.base)
    result = parser_for(len(notes) + len(rodata)).parse_note_blocks(
        helper, where.notes_addr, notes, where.rodata_addr, rodata, requester=requester
    )
    return NotesObject(helper, where, notes, rodata, result)


def size_error(size: int, limits: ParseLimits) -> Err | None:
    """The Err the parser would send for a DOF over the size limit (checked before sending)."""
    if size <= limits.max_dof_size:
        return None
    return Err(errno=errno.E2BIG, message=f"data size {size} exceeds maximum {limits.max_dof_size}")


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
        cache: ParseCache | None = None,
    ) -> None:
        """*command* replaces the child's argv (default: this interpreter running
        ``parserd`` with the limits); it lets a debugger or ``strace`` wrap the child.
        *cache*: accepted results by request content (:mod:`.parsecache`), so a
        byte-identical request (a fork child re-registering) skips the child."""
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
        # A parse that times out is the request's fault: its sender is penalised
        # (by the receiver), the lane is not.
        self._slot = ChildSlot("parser child", self.argv, self.log, timeouts_back_off=False)
        self._decoder: FrameDecoder[list[ParserRecord]] = FrameDecoder(
            list[ParserRecord], MAX_RECORD_FRAME
        )
        self._encoder = msgspec.msgpack.Encoder()
        self._frames = FrameEncoder()
        self.cache = cache

    # --- lifecycle ----------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._slot.pid

    @property
    def _child(self) -> RunningChild | None:
        """The live child (tests play a broken host on its pipes)."""
        return self._slot.child

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
            f"--max-object-reads={lim.max_object_reads}",
            f"--max-object-bytes={lim.max_object_bytes}",
            f"--cpu-limit={max(1, int(2 * self.restart_after_cpu))}",
        ]
        return argv

    def start(self) -> None:
        """Start the child now (otherwise the first :meth:`parse` does)."""
        with self._lock:
            if self._slot.child is None:
                self._slot.start()

    def stop(self) -> None:
        """Close the request pipe, give the child a moment to exit, then kill it."""
        with self._lock:
            self._slot.stop("stopping")

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
        return self.parse_result(helper, dof, meanwhile=meanwhile).probes

    def parse_result(
        self,
        helper: bytes,
        dof: bytes,
        *,
        meanwhile: Callable[[], object] | None = None,
        requester: int | None = None,
    ) -> ParseResult:
        """:meth:`parse`, answering the record stream too (what the receiver stashes).

        *requester* (the calling thread id) uses the cache, if this child has
        one: an accepted result is kept, and a byte-identical request of
        another requester is answered from it.
        """
        cache = self.cache if requester is not None else None
        key = dof_key(helper, dof) if cache is not None else b""
        if cache is not None and requester is not None:
            hit = cache.get(key, requester)
            if hit is not None:
                if meanwhile is not None:
                    meanwhile()
                return ParseResult(*hit)
        checked = self._run(helper, dof, meanwhile)
        if checked.error is not None:
            raise RequestRejected(checked.error.errno, checked.error.message)
        result = ParseResult(checked.records, checked.probes)
        if cache is not None and requester is not None:
            cache.put(key, result.records, result.probes, requester)
        return result

    def parse_records(self, helper: bytes, dof: bytes) -> list[ResultRecord]:
        """The checked record stream (ending in Eof or Err), for tools that print it."""
        return self._run(helper, dof).records

    def locate_notes(
        self,
        helper: bytes,
        size: int,
        read: ReadFn,
        *,
        meanwhile: Callable[[], object] | None = None,
        dof: bool = False,
        requester: int | None = None,
    ) -> NotesLocation:
        """Where an ELF object's ``.note.usdt`` and ``.rodata`` lie (the ELF phase).

        The child interprets the object; it sees its bytes only through
        ``ReadAt`` records, which this method answers with *read(offset, size)*
        (a bounded ``pread`` on the object the receiver holds), within the file
        size and the request's budgets (``max_object_reads``,
        ``max_object_bytes``).  Raises :class:`RequestRejected` when the parser
        refused the object.  *dof* (catch-up): locate ``.SUNW_dof`` too, and
        accept an object that has only that (``NotesLocation.notes_found``).
        *requester*: as for :meth:`parse_result`; a hit re-reads what the parser
        read of the object and is used only if those bytes are the same.
        """
        if len(helper) != DOF_HELPER.size:
            raise ValueError(f"dof_helper_t is {DOF_HELPER.size} bytes, got {len(helper)}")
        cache = self.cache if requester is not None else None
        key = b""
        if cache is not None and requester is not None:
            key = locate_key(helper, size, dof)
            hit = cache.get_location(key, requester, read)
            if hit is not None:
                if meanwhile is not None:
                    meanwhile()
                return hit
        reads = _ObjectReads(read, size, self.limits, record=cache is not None)
        located = _Located()
        self._request(LocateNotes(helper=helper, size=size, dof=dof), located, meanwhile, reads)
        if located.error is not None:
            raise RequestRejected(located.error.errno, located.error.message)
        assert located.location is not None
        if cache is not None and requester is not None:
            cache.put_location(key, reads.log, located.location, requester)
        return located.location

    def parse_note_blocks(
        self,
        helper: bytes,
        notes_addr: int,
        notes: bytes,
        rodata_addr: int,
        rodata: bytes,
        *,
        meanwhile: Callable[[], object] | None = None,
        requester: int | None = None,
    ) -> ParseResult:
        """Parse the two blocks of a notes object (``helper``'s ``dofhp_addr`` is the base).

        *requester*: as for :meth:`parse_result`.
        """
        if len(helper) != DOF_HELPER.size:
            raise ValueError(f"dof_helper_t is {DOF_HELPER.size} bytes, got {len(helper)}")
        if len(notes) + len(rodata) > self.limits.max_object_bytes:
            raise RequestRejected(
                errno.E2BIG,
                f"notes and .rodata of {len(notes) + len(rodata)} bytes exceed "
                f"max_object_bytes {self.limits.max_object_bytes}",
            )
        cache = self.cache if requester is not None else None
        key = b""
        if cache is not None and requester is not None:
            key = notes_key(helper, notes_addr, notes, rodata_addr, rodata)
            hit = cache.get(key, requester)
            if hit is not None:
                if meanwhile is not None:
                    meanwhile()
                return ParseResult(*hit)
        checked = _Checked(self.limits, notes=True)
        request = ParseNoteBlocks(
            helper=helper,
            notes_addr=notes_addr,
            notes=notes,
            rodata_addr=rodata_addr,
            rodata=rodata,
        )
        self._request(request, checked, meanwhile)
        if checked.error is not None:
            raise RequestRejected(checked.error.errno, checked.error.message)
        result = ParseResult(checked.records, checked.probes)
        if cache is not None and requester is not None:
            cache.put(key, result.records, result.probes, requester)
        return result

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
        checked = _Checked(self.limits)
        self._request(ParseRequest(helper=helper, dof=dof), checked, meanwhile)
        return checked

    def _request(
        self,
        request: ParserRequest,
        answer: _Answer,
        meanwhile: Callable[[], object] | None,
        reads: _ObjectReads | None = None,
    ) -> None:
        """One exchange: *request* out, its answer fed into *answer* (ReadAt answered by *reads*)."""
        body = bytearray(HEADER_SIZE)
        self._encoder.encode_into(request, body, HEADER_SIZE)
        HEADER.pack_into(body, 0, len(body) - HEADER_SIZE)
        with self._lock:
            child = self._ready_child()
            self._exchange(child, memoryview(body), answer, meanwhile, reads)
            self._slot.succeeded(child)
            if child.requests >= self.restart_after_requests:
                self._slot.stop(f"scheduled restart after {child.requests} requests")
            elif (
                child.requests % _CPU_CHECK_EVERY == 0
                and (cpu := child.cpu_seconds()) >= self.restart_after_cpu
            ):
                self._slot.stop(f"scheduled restart after {cpu:.0f} CPU seconds")

    def _ready_child(self) -> RunningChild:
        """The live child, after checking that nothing arrived since the last request."""
        child = self._slot.child
        if child is not None:
            try:
                self._drain_idle(child)
            except ChildFailed as err:
                self.log.warning("%s", err)
                child = None
        return child if child is not None else self._slot.start()

    def _drain_idle(self, child: RunningChild) -> None:
        """Between requests only Log records may arrive; EOF means the child died idle."""
        pending = bytearray()
        while (data := self._slot.read_idle(child)) is not None:
            if not data:
                raise self._slot.failed(child, "closed its pipe between requests", kill=False)
            pending += data
            try:
                batches, used = self._decoder.split(pending)
            except ProtocolError as err:
                raise self._slot.failed(child, f"sent a bad frame: {err}", kill=True) from err
            del pending[:used]
            for batch in batches:
                for rec in batch:
                    if not isinstance(rec, Log):
                        raise self._slot.failed(
                            child, f"sent {type(rec).__name__} between requests", kill=True
                        )
                    self._emit(rec)
        if pending:
            raise self._slot.failed(child, "left a partial frame between requests", kill=True)

    def _exchange(
        self,
        child: RunningChild,
        frame: memoryview,
        answer: _Answer,
        meanwhile: Callable[[], object] | None,
        reads: _ObjectReads | None,
    ) -> None:
        # -t bounds a *silent* child (each wait in send and receive); the whole
        # exchange has only a backstop, far beyond any honest parse, against a
        # child that trickles bytes forever.
        deadline = time.monotonic() + self.timeout * (
            _BACKSTOP_TIMEOUTS + len(frame) / _BYTES_PER_TIMEOUT
        )
        self._slot.send(child, frame, deadline, self.timeout)
        side_error: BaseException | None = None
        if meanwhile is not None:
            try:
                meanwhile()
            except Exception as err:
                side_error = err
        self._receive(child, deadline, answer, reads)
        if side_error is not None:
            raise side_error

    def _receive(
        self, child: RunningChild, deadline: float, answer: _Answer, reads: _ObjectReads | None
    ) -> None:
        pending = bytearray()
        while not answer.done:
            pending += self._slot.receive_some(child, deadline, self.timeout)
            try:
                batches, used = self._decoder.split(pending)
                del pending[:used]
                for i, batch in enumerate(batches):
                    last = batch[-1] if batch else None
                    if isinstance(last, ReadAt):
                        if reads is None:
                            raise ProtocolError("ReadAt in the answer to a request without a file")
                        if i != len(batches) - 1 or pending:
                            raise ProtocolError("records after a ReadAt before its answer")
                        answer.feed_batch(batch[:-1], self._emit)
                        data = reads.answer(last)
                        frame = self._frames.encode(ObjectBytes(data=data))
                        self._slot.send(child, memoryview(frame), deadline, self.timeout)
                    else:
                        answer.feed_batch(batch, self._emit)
                        if len(batch) >= _YIELD_AFTER_RECORDS:
                            # let the small lanes' threads have the GIL between two
                            # batches of a huge answer (~1.5 µs a record to check)
                            time.sleep(0)
                if answer.done and pending:
                    raise ProtocolError("bytes after the end of the stream")
            except ProtocolError as err:
                raise self._slot.failed(child, f"broke the protocol: {err}", kill=True) from err

    def _emit(self, rec: Log) -> None:
        level = rec.level if rec.level > 0 else logging.DEBUG
        self.log.log(level, "parser: %s", rec.message.encode("unicode_escape").decode("ascii"))


class _Checked:
    """The stream of one request as it passes the grammar and the provider limit."""

    def __init__(self, limits: ParseLimits, *, notes: bool = False) -> None:
        self._checker = StreamChecker(
            max_probes=limits.max_probes,
            max_tracepoints=limits.max_tracepoints,
            max_providers=limits.max_providers,
            notes=notes,
        )
        self.records: list[ResultRecord] = []
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
        """Check a batch (the hot loop: 2000 probes are ~6000 records); the runs between
        ``Log`` records go to the checker whole."""
        checker = self._checker
        start = 0
        for index, rec in enumerate(batch):
            if type(rec) is not Log:
                continue
            self._feed_run(batch, start, index)
            if checker.done:
                raise ProtocolError("Log record after the end of the stream")
            self.logs += 1
            if self.logs > MAX_LOG_RECORDS:
                raise ProtocolError(f"more than {MAX_LOG_RECORDS} Log records")
            on_log(rec)
            start = index + 1
        self._feed_run(batch, start, len(batch))

    def _feed_run(self, batch: list[ParserRecord], start: int, stop: int) -> None:
        if start < stop:
            run: list[ResultRecord] = batch[start:stop]  # type: ignore[assignment]  # no Log in it
            # after the end record: "expected nothing"
            self._checker.feed_all(run)
            self.records.extend(run)


def _no_log(rec: Log) -> None:
    raise ProtocolError("Log record where none may be")


class _Answer(Protocol):
    """What an exchange feeds the child's batches into."""

    @property
    def done(self) -> bool: ...
    def feed_batch(self, batch: list[ParserRecord], on_log: Callable[[Log], None]) -> None: ...


class _Located:
    """The answer to LocateNotes: Log records, then exactly one NotesLocation or Err."""

    def __init__(self) -> None:
        self.location: NotesLocation | None = None
        self.error: Err | None = None
        self.logs = 0

    @property
    def done(self) -> bool:
        return self.location is not None or self.error is not None

    def feed_batch(self, batch: list[ParserRecord], on_log: Callable[[Log], None]) -> None:
        for rec in batch:
            if self.done:
                raise ProtocolError(f"{type(rec).__name__} after the answer")
            if isinstance(rec, Log):
                self.logs += 1
                if self.logs > MAX_LOG_RECORDS:
                    raise ProtocolError(f"more than {MAX_LOG_RECORDS} Log records")
                on_log(rec)
            elif isinstance(rec, NotesLocation):
                self.location = rec
            elif isinstance(rec, Err):
                self.error = rec
            else:
                raise ProtocolError(f"{type(rec).__name__} in the answer to LocateNotes")


class _ObjectReads:
    """Answers the child's ReadAt from the object, within its size and the budgets.

    The child bounds its own reads; one that asks past the file or the budgets is
    broken or compromised (a protocol error), not the object's sender.
    """

    def __init__(
        self, read: ReadFn, size: int, limits: ParseLimits, *, record: bool = False
    ) -> None:
        """*record*: keep (offset, size, digest) of every answer in :attr:`log` (the
        parse cache checks a later object against it)."""
        self._read = read
        self._size = size
        self._reads_left = limits.max_object_reads
        self._bytes_left = limits.max_object_bytes
        self._record = record
        self.log: list[tuple[int, int, bytes]] = []

    def answer(self, rec: ReadAt) -> bytes:
        if self._reads_left <= 0:
            raise ProtocolError("more ReadAt than max_object_reads")
        if rec.offset >= self._size or rec.size > self._size - rec.offset:
            raise ProtocolError(
                f"ReadAt({rec.offset}, {rec.size}) past the object's {self._size} bytes"
            )
        if rec.size > self._bytes_left:
            raise ProtocolError("ReadAt beyond max_object_bytes")
        self._reads_left -= 1
        self._bytes_left -= rec.size
        data = self._read(rec.offset, rec.size)
        if len(data) > rec.size:  # shorter only when the file shrank meanwhile
            raise ValueError(f"read({rec.offset}, {rec.size}) returned {len(data)} bytes")
        if self._record:
            self.log.append((rec.offset, rec.size, read_digest(data)))
        return data
