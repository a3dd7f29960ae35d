"""The ioctl logic: one helper request → identity → parse → tracepoint check → stash.

The device layer (FUSE file or CUSE) decodes requests and hands each one to
:meth:`Receiver.handle` together with a ``reply`` callable; this module sees
decoded requests, never device bytes, and is the only place where exceptions
become a negative errno for a client:

* ADDDOF: every refusal answers ``-EINVAL``, as upstream does (the specific
  errno and reason go to the log);
* REMOVE: ``0`` (also for an unknown generation), ``-EINVAL`` when refused;
* anything that is not a :class:`~common.errors.DtprobedError` is our own bug:
  its traceback is logged and the client gets ``-EIO``.

Order of an ADDDOF (a refused DOF leaves nothing behind: docs/security.md):
send the DOF to the sandboxed parser and, while it parses, resolve the
calling thread to its process, open a pidfd on it and read its start time,
mappings and auxv; take the parser's answer (validated by ``ParserChild``);
check every tracepoint lies in
an executable, file-backed mapping of the caller; only then send the
registration to the stash writer, which commits it all or nothing (and prunes
the process's older generations itself when it sees an exec).  On success
the process is watched through its pidfd and pruned as soon as it exits.

Concurrency (a huge DOF must not stall every other registration).  Every
USDT program blocks in its ioctl until we answer, so the device loop never
waits for a request: it queues the work and goes on reading.  Work is routed by DOF size to one of two lanes, each with its own
sandboxed parser child and its own worker threads:

* the *small* lane (DOF < 64 KiB: every ordinary ``dtrace -G`` object) has
  :data:`SMALL_WORKERS` threads sharing one parser (one request at a time):
  a request's /proc reads overlap its own parse (they run while the child
  parses), and one request's stash write overlaps another's parse;
* the *large* lane has one thread and its own parser, so a 20000-probe DOF
  parses while small registrations keep flowing through the small lane.

The stash writer is one process (the only writer of the state directory);
requests of both lanes meet there, one command at a time, so a very large
commit still delays small ones by the time the writer spends on it — measured
in ``bench/bench_receiver.py``.  Queued work is bounded
(:data:`MAX_QUEUED_BYTES`), so a flood of large DOF is refused instead of
exhausting memory.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Final, Protocol

from common.dof_abi import DOF_HELPER, DTRACE_MODNAMELEN
from common.errors import ChildFailed, DtprobedError, RequestRejected, StashError
from common.records import NotesLocation, ResultRecord
from common.stash_protocol import RawBlock, Registration
from dtprobed.children.parser import ParseResult
from dtprobed.daemon.exitwatch import ExitWatcher
from dtprobed.daemon.identity import Caller, identify, identify_object, tgid_of
from dtprobed.device.request import HelperRequest

log = logging.getLogger("dtprobed")

#: DOF below this size goes to the small lane (one CUSE chunk; every ordinary object).
SMALL_DOF: Final = 64 * 1024
SMALL_WORKERS: Final = 3
#: Bytes of DOF queued or in flight across both lanes before new requests are refused.
MAX_QUEUED_BYTES: Final = 1 << 30
#: Consecutive stash-writer failures after which the daemon gives up (exit 2).
WRITER_FAILURES_FATAL: Final = 5

Reply = Callable[[int], None]


class Parser(Protocol):
    def parse_result(
        self, helper: bytes, dof: bytes, *, meanwhile: Callable[[], object] | None = None
    ) -> ParseResult: ...
    def locate_notes(
        self, helper: bytes, size: int, read: Callable[[int, int], bytes]
    ) -> NotesLocation: ...
    def parse_note_blocks(
        self, helper: bytes, notes_addr: int, notes: bytes, rodata_addr: int, rodata: bytes
    ) -> ParseResult: ...


class Writer(Protocol):
    def register_records(self, reg: Registration, records: list[ResultRecord]) -> int: ...
    def remove(self, pid: int, gen: int) -> bool: ...
    def remove_pid(self, pid: int) -> None: ...


def _module_name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


class Receiver:
    """Drives helper requests through the parsers and the stash writer.

    *on_fatal(status, reason)* is called (once) when the daemon can no longer
    serve — the stash writer keeps failing — and should make the main loop
    exit with *status*.
    """

    def __init__(
        self,
        *,
        small_parser: Parser,
        large_parser: Parser,
        writer: Writer,
        watcher: ExitWatcher,
        on_fatal: Callable[[int, str], None],
    ) -> None:
        self._small_parser = small_parser
        self._large_parser = large_parser
        self._writer = writer
        self._watcher = watcher
        self._on_fatal = on_fatal
        self._small = concurrent.futures.ThreadPoolExecutor(
            SMALL_WORKERS, thread_name_prefix="dtprobed-small"
        )
        self._large = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dtprobed-large")
        self._lock = threading.Lock()
        self._queued_bytes = 0
        self._writer_failures = 0
        self._closed = False

    # --- entry point from the device layer (must not block) --------------------------

    def handle(self, request: HelperRequest, reply: Reply) -> None:
        """Queue *request*; *reply* is called exactly once, from a worker thread."""
        size = len(request.dof) if request.kind == "adddof" else 0
        with self._lock:
            if self._closed:
                refused = "the daemon is shutting down"
            elif self._queued_bytes + size > MAX_QUEUED_BYTES:
                refused = f"{self._queued_bytes} bytes of DOF already queued"
            else:
                refused = ""
                self._queued_bytes += size
        if refused:
            log.warning("%d: dtprobed: request refused: %s", request.tid, refused)
            _safe_reply(reply, -errno.EINVAL)
            return
        lane = self._large if size >= SMALL_DOF else self._small
        try:
            lane.submit(self._run, request, reply, size)
        except RuntimeError:  # executor shut down between the check and here
            self._release(size)
            _safe_reply(reply, -errno.EINVAL)

    def _release(self, size: int) -> None:
        with self._lock:
            self._queued_bytes -= size

    def _run(self, request: HelperRequest, reply: Reply, size: int) -> None:
        # The client is blocked in its ioctl: answer first, log afterwards (a log
        # line costs the client ~0.05 ms otherwise).
        report: Callable[[], None]
        try:
            if request.kind == "adddof":
                result, report = self._adddof(request, size)
            elif request.kind == "hasusdt":
                result, report = self._hasusdt(request)
            elif request.kind == "remove":
                result, report = self._remove(request)
            else:  # a kind the device layer knows and we don't (yet): EINVAL
                raise RequestRejected(errno.EINVAL, f"{request.kind} is not supported")
        except RequestRejected as err:
            # The client's fault: the parser's (or our check's) message, at WARNING.
            report = partial(log.warning, "%d: dtprobed: %s", request.tid, err.reason)
            result = -errno.EINVAL
        except ChildFailed as err:
            report = partial(
                log.error, "%d: dtprobed: request failed, child broke: %s", request.tid, err
            )
            result = -errno.EINVAL
        except StashError as err:
            if err.errno == errno.EDQUOT:  # the caller's (or the stash's) share is used up
                what, level = "stash quota refused the registration", logging.WARNING
            else:
                what, level = (
                    f"cannot stash it ({errno.errorcode.get(err.errno, err.errno)})",
                    (logging.ERROR),
                )
            report = partial(log.log, level, "%d: dtprobed: %s: %s", request.tid, what, err)
            result = -errno.EINVAL
        except DtprobedError as err:
            report = partial(
                log.error, "%d: dtprobed: %s: %s", request.tid, type(err).__name__, err
            )
            result = -errno.EINVAL
        except Exception:
            report = partial(
                log.error,
                "%d: dtprobed: internal error (a bug)",
                request.tid,
                exc_info=sys.exc_info(),
            )
            result = -errno.EIO
        finally:
            self._release(size)
        _safe_reply(reply, result)
        report()

    # --- ADDDOF -------------------------------------------------------------------

    def _adddof(self, request: HelperRequest, size: int) -> tuple[int, Callable[[], None]]:
        """The generation, and the log lines to write once the client has it."""
        started = time.monotonic()
        helper = request.helper  # 80 bytes: the device layer checked it
        fields = DOF_HELPER.unpack_from(helper)
        dof_addr: int = fields.dof
        parser = self._large_parser if size >= SMALL_DOF else self._small_parser
        identified: list[Caller] = []

        def identify_caller() -> None:
            identified.append(identify(request.tid, dof_addr))

        # The /proc reads overlap the parse: the parser child works while we read.
        try:
            result = parser.parse_result(helper, request.dof, meanwhile=identify_caller)
        except BaseException:
            for caller in identified:
                caller.close()
            raise
        parsed = time.monotonic()
        if not identified:  # a Parser implementation that answered without running it
            identify_caller()
        caller = identified[0]
        try:
            gen = self._commit(caller, helper, [RawBlock(0, request.dof)], result, None)
        finally:
            caller.close()
        what = f"module {_module_name(fields.mod)}"
        return gen, _report(caller, gen, what, result, f"{size} bytes of DOF", started, parsed)

    # --- HASUSDT ------------------------------------------------------------------

    def _hasusdt(self, request: HelperRequest) -> tuple[int, Callable[[], None]]:
        """Register the ``.note.usdt`` object that ``request.address`` lies in.

        Two exchanges with the sandboxed parser, which alone interprets the
        object: the ELF phase locates ``.note.usdt`` and ``.rodata`` (it reads
        headers through bounded ``pread``s we answer); we read those two
        sections once, and the parser parses exactly those bytes, which are
        also what the stash keeps as the raw blocks (so a reparse parses them
        again, with no file).
        """
        started = time.monotonic()
        caller, obj = identify_object(request.tid, request.address)
        try:
            name = obj.module.encode("utf-8", "surrogateescape")[: DTRACE_MODNAMELEN - 1]
            helper = DOF_HELPER.pack(name.ljust(DTRACE_MODNAMELEN, b"\0"), obj.first.start, 0)
            where = self._small_parser.locate_notes(helper, obj.size, partial(_pread, obj.fd))
            notes = _pread(obj.fd, where.notes_offset, where.notes_size)
            rodata = _pread(obj.fd, where.rodata_offset, where.rodata_size)
            if len(notes) != where.notes_size or len(rodata) != where.rodata_size:
                raise RequestRejected(errno.EINVAL, f"object {obj.module} shrank while read")
            # dofhp_addr is the load base as upstream stores it: the first mapping
            # of an ET_DYN object, 0 for ET_EXEC (the parser told which).
            helper = DOF_HELPER.pack(name.ljust(DTRACE_MODNAMELEN, b"\0"), where.base, 0)
            size = len(notes) + len(rodata)
            parser = self._large_parser if size >= SMALL_DOF else self._small_parser
            result = parser.parse_note_blocks(
                helper, where.notes_addr, notes, where.rodata_addr, rodata
            )
            parsed = time.monotonic()
            blocks = [RawBlock(where.notes_addr, notes), RawBlock(where.rodata_addr, rodata)]
            gen = self._commit(caller, helper, blocks, result, (caller.dev, caller.ino))
        finally:
            obj.close()
            caller.close()
        sizes = f"{size} bytes of notes and .rodata"
        return gen, _report(caller, gen, f"object {obj.module}", result, sizes, started, parsed)

    def _commit(
        self,
        caller: Caller,
        helper: bytes,
        raw: list[RawBlock],
        result: ParseResult,
        object_key: tuple[int, int] | None,
    ) -> int:
        """Check the tracepoints, stash the registration, watch the process; the generation."""
        self._watcher.settle(caller.pid)
        caller.space.check_tracepoints(result.tracepoint_addrs(), object_key=object_key)
        if not caller.still_alive():
            raise RequestRejected(errno.EINVAL, f"process {caller.pid} exited")
        gen = self._register(caller, helper, raw, result.records)
        self._watcher.watch(caller.pid, caller.take_pidfd())
        return gen

    def _register(
        self, caller: Caller, helper: bytes, raw: list[RawBlock], records: list[ResultRecord]
    ) -> int:
        reg = Registration(
            pid=caller.pid,
            start_time=caller.start_time,
            dev=caller.dev,
            ino=caller.ino,
            exec_dev=caller.exec_dev,
            exec_ino=caller.exec_ino,
            exec_token=caller.exec_token,
            helper=helper,
            raw=raw,
        )
        return self._writer_call(lambda: self._writer.register_records(reg, records))

    def _writer_call(self, call: Callable[[], int]) -> int:
        try:
            result = call()
        except ChildFailed as err:
            with self._lock:
                self._writer_failures += 1
                failures = self._writer_failures
            if failures >= WRITER_FAILURES_FATAL:
                self._on_fatal(2, f"the stash writer failed {failures} times in a row: {err}")
            raise
        with self._lock:
            self._writer_failures = 0
        return result

    # --- REMOVE -------------------------------------------------------------------

    def _remove(self, request: HelperRequest) -> tuple[int, Callable[[], None]]:
        if not 0 <= request.gen <= 0x7FFFFFFF:  # no such generation (e.g. REMOVE(-1)):
            # 0 as upstream, and nothing the writer's Gen bound would refuse leaves us
            return 0, partial(
                log.debug, "%d: REMOVE of unknown generation %d", request.tid, request.gen
            )
        pid = tgid_of(request.tid)
        existed = self._writer_call(lambda: int(self._writer.remove(pid, request.gen)))
        if existed:
            return 0, partial(log.info, "%d: removed generation %d", pid, request.gen)
        return 0, partial(log.debug, "%d: REMOVE of unknown generation %d", pid, request.gen)

    # --- exits --------------------------------------------------------------------

    def prune_exited(self, pid: int) -> None:
        """``ExitWatcher`` callback: drop everything *pid* registered."""
        started = time.monotonic()
        self._writer_call(lambda: _done(self._writer.remove_pid, pid))
        log.info("%d: pruned: process exited (%.1f ms)", pid, (time.monotonic() - started) * 1000)

    def close(self) -> None:
        """Refuse new requests and finish (answer) the queued ones."""
        with self._lock:
            self._closed = True
        self._small.shutdown(wait=True)
        self._large.shutdown(wait=True)


def _report(
    caller: Caller,
    gen: int,
    what: str,
    result: ParseResult,
    sizes: str,
    started: float,
    parsed: float,
) -> Callable[[], None]:
    """The log lines of one registration, written once the client has its answer."""
    done = time.monotonic()

    def report() -> None:
        log.debug(
            "%d: identify and parse %.1f ms, check and stash %.1f ms",
            caller.pid,
            (parsed - started) * 1000,
            (done - parsed) * 1000,
        )
        log.info(
            "%d: registered generation %d: %s, %d-%d, %d probes, %s (%.1f ms)",
            caller.pid,
            gen,
            what,
            caller.dev,
            caller.ino,
            len(result.probes),
            sizes,
            (done - started) * 1000,
        )

    return report


def _pread(fd: int, offset: int, size: int) -> bytes:
    """*size* bytes of the object at *offset* (fewer only at its end)."""
    chunks: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, min(size, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _done(call: Callable[..., None], *args: int) -> int:
    call(*args)
    return 0


def _safe_reply(reply: Reply, result: int) -> None:
    try:
        reply(result)
    except Exception:
        # The device is going away or the request was interrupted: nothing to tell.
        log.debug("reply %d could not be sent", result, exc_info=True)
