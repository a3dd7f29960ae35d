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
waits for a request — and never touches client memory: it queues the work
and goes on reading.  Work is routed by DOF size to one of two lanes, each
with its own sandboxed parser child and its own worker threads:

* the *small* lane (DOF < 64 KiB: every ordinary ``dtrace -G`` object) has
  :data:`SMALL_WORKERS` threads sharing one parser (one request at a time):
  a request's /proc reads overlap its own parse (they run while the child
  parses), and one request's stash write overlaps another's parse;
* the *large* lane has one thread and its own parser, so a 20000-probe DOF
  parses while small registrations keep flowing through the small lane.

FUSE-file requests arrive unfetched (``remote``): a small-lane worker
fetches the DOF through a fetch helper process with a time bound
(:mod:`dtprobed.device.fetch`); a header whose ``loadsz`` is ≥ 64 KiB moves
the request to the large lane, which fetches it there.  Queued requests
thus hold 80 bytes each, not their DOF.

Fairness (:mod:`dtprobed.daemon.fairness`, docs/security.md): per uid, the
lanes serve queues round-robin; DOF bytes are budgeted per lane and per uid;
a sender whose request made a child time out or crash, or whose memory
could not be fetched in time, is refused at once for a growing, bounded
time; a uid that used much parser time recently goes to the large lane;
per-request log lines are rate-limited per uid.

The stash writer is one process (the only writer of the state directory);
requests of both lanes meet there, one command at a time, so a very large
commit still delays small ones by the time the writer spends on it — measured
in ``bench/bench_receiver.py``.  After a request with a large DOF or many
records, freed heap is handed back to the kernel (``malloc_trim``), so the
daemon returns to its rest size.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Final, Protocol

from common.dof_abi import DOF_HDR, DOF_HELPER, DTRACE_MODNAMELEN
from common.errors import ChildFailed, DtprobedError, RequestRejected, StashError
from common.limits import DEFAULT_MAX_QUEUED_BYTES
from common.records import NotesLocation, ResultRecord
from common.stash_protocol import UNKNOWN_UID, RawBlock, Registration
from dtprobed.children.parser import NotesParser, ParseResult, notes_helper, parse_object_notes
from dtprobed.daemon.catchup import AMBIGUOUS_GENS
from dtprobed.daemon.exitwatch import ExitWatcher
from dtprobed.daemon.fairness import (
    Budget,
    FairLane,
    Fairness,
    LaneClosed,
    ParseMeter,
    Penalties,
    argument_bytes,
    fix_mmap_threshold,
)
from dtprobed.daemon.identity import Caller, identify, identify_object, tgid_of
from dtprobed.device.fetch import FetchPool, FetchTimeout
from dtprobed.device.ratelog import RateLog
from dtprobed.device.request import HelperRequest, check_dof_header, helper_dof_address
from dtprobed.oslib.procfs import fsuid_of

log = logging.getLogger("dtprobed")

#: DOF below this size goes to the small lane (one CUSE chunk; every ordinary object).
SMALL_DOF: Final = 64 * 1024
SMALL_WORKERS: Final = 3
#: Bytes of DOF queued or in flight in the large lane before new requests are refused.
MAX_QUEUED_BYTES: Final = DEFAULT_MAX_QUEUED_BYTES
#: After a request with this much DOF, or this many records, ``malloc_trim`` the heap.
TRIM_AFTER_BYTES: Final = 1 << 20
TRIM_AFTER_RECORDS: Final = 20000
#: Consecutive stash-writer failures after which the daemon gives up (exit 2).
WRITER_FAILURES_FATAL: Final = 5

Reply = Callable[[int], None]
#: The caller's fsuid was not read yet (``Receiver._commit`` reads it then).
_UNREAD: Final = object()


class Parser(NotesParser, Protocol):
    """What the receiver needs of a parser (:class:`ParserChild`): notes, DOF, the locate step."""

    def parse_result(
        self,
        helper: bytes,
        dof: bytes,
        *,
        meanwhile: Callable[[], object] | None = None,
        requester: int | None = None,
    ) -> ParseResult: ...
    def locate_notes(
        self,
        helper: bytes,
        size: int,
        read: Callable[[int, int], bytes],
        *,
        dof: bool = False,
        requester: int | None = None,
    ) -> NotesLocation: ...


class Writer(Protocol):
    def register_records(self, reg: Registration, records: list[ResultRecord]) -> int: ...
    def remove(self, pid: int, gen: int) -> bool: ...
    def remove_pid(self, pid: int, *, may_defer: bool = False) -> None: ...


@dataclass
class _Job:
    """One queued request, and what it holds of the lanes' budgets."""

    request: HelperRequest
    reply: Reply
    lane: str  # "small" or "large"
    size: int  # DOF bytes known (CUSE: the DOF; FUSE: 0 until fetched)
    dof: bytes = b""
    loadsz: int = 0  # FUSE, moved to the large lane: the loadsz its header claimed
    held: list[tuple[Budget, int]] = field(default_factory=list)
    moved: bool = False  # handed on to the large lane (which answers it)
    heavy: bool = False  # a big DOF or many records: trim the heap afterwards
    in_parser: bool = False  # set while the parser child has it (a failure then is its fault)


class _Moved(Exception):
    """The job went on to the large lane: no reply yet."""


_libc = ctypes.CDLL(None, use_errno=True)


def trim_heap() -> None:
    """Collect cyclic garbage, then give freed heap pages back to the kernel (glibc
    ``malloc_trim``; all arenas): without the collection, a hostile request's
    leftovers in cycles pin the arenas its 20 MB of records came from."""
    gc.collect()
    with contextlib.suppress(AttributeError):  # not glibc
        _libc.malloc_trim(0)


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
        fetch: FetchPool | None = None,
        fairness: Fairness | None = None,
        penalties: Penalties | None = None,
        ratelog: RateLog | None = None,
    ) -> None:
        fix_mmap_threshold()  # a hostile request's big buffers go back to the kernel
        self._small_parser = small_parser
        self._large_parser = large_parser
        self._writer = writer
        self._watcher = watcher
        self._on_fatal = on_fatal
        self._fetch = fetch or FetchPool(log=log)
        self.fairness = fair = fairness or Fairness()
        self.penalties = penalties or Penalties()
        self.ratelog = ratelog or RateLog(log)
        self._parse_meter = ParseMeter(fair.heavy_parse_seconds)
        self._budgets = {
            "small": Budget("small", fair.small_queued_bytes, fair.small_queued_bytes_per_uid),
            "large": Budget("large", fair.max_queued_bytes, fair.max_queued_bytes_per_uid),
        }
        self._lanes = {
            "small": FairLane("small", SMALL_WORKERS, max_queued_per_uid=fair.max_queued_per_uid),
            "large": FairLane("large", 1, max_queued_per_uid=fair.max_queued_per_uid),
        }
        self._lock = threading.Lock()
        self._writer_failures = 0
        self._closed = False
        #: Set by the daemon when catch-up runs: REMOVE(0 or -1) from *pid* goes there first
        #: (:meth:`dtprobed.daemon.catchup.CatchUp.on_ambiguous_remove`).
        self.ambiguous_remove: Callable[[int], int | None] | None = None

    # --- entry point from the device layer (must not block) --------------------------

    def handle(self, request: HelperRequest, reply: Reply) -> None:
        """Queue *request*; *reply* is called exactly once, from a worker thread."""
        uid = request.uid
        size = len(request.dof) if request.kind == "adddof" else 0
        lane = "large" if size >= SMALL_DOF else "small"
        job = _Job(request, reply, lane, size)
        refused = self._admit(job)
        if not refused:
            try:
                refused = self._lanes[lane].submit(uid, partial(self._run, job))
            except LaneClosed:
                refused = "the daemon is shutting down"
        if refused:
            self._release(job)
            self.ratelog(
                uid, logging.WARNING, "%d: dtprobed: request refused: %s", request.tid, refused
            )
            _safe_reply(reply, -errno.EINVAL)

    def _admit(self, job: _Job) -> str:
        """Why *job* is refused at once ("" if it is not); reserves its bytes."""
        request, uid = job.request, job.request.uid
        with self._lock:
            if self._closed:
                return "the daemon is shutting down"
        if request.kind != "adddof" and request.kind != "hasusdt":
            return ""  # REMOVE costs nothing and must always get through
        penalty = self.penalties.remaining(uid)
        if penalty > 0:
            return (
                f"uid {uid} is refused for another {penalty:.1f} s (its requests broke the parser)"
            )
        if request.remote and self._fetch.over_stuck_limit(uid):
            return (
                f"uid {uid} has {self._fetch.stuck(uid)} fetches stuck in the kernel "
                "(DOF on a stalled file system)"
            )
        if job.size:
            return self._hold(job, job.lane, job.size)
        return ""

    def _hold(self, job: _Job, lane: str, size: int) -> str:
        budget = self._budgets[lane]
        refused = budget.take(job.request.uid, size)
        if not refused:
            job.held.append((budget, size))
        return refused

    def _release(self, job: _Job) -> None:
        held, job.held = job.held, []
        for budget, size in held:
            budget.give(job.request.uid, size)

    def _run(self, job: _Job) -> None:
        # The client is blocked in its ioctl: answer first, log afterwards (a log
        # line costs the client ~0.05 ms otherwise).
        request, uid = job.request, job.request.uid
        report: Callable[[], object]
        job.moved = False
        try:
            if request.kind == "adddof":
                result, report = self._adddof(job)
            elif request.kind == "hasusdt":
                result, report = self._hasusdt(job)
            elif request.kind == "remove":
                result, report = self._remove(request)
            else:  # a kind the device layer knows and we don't (yet): EINVAL
                raise RequestRejected(errno.EINVAL, f"{request.kind} is not supported")
        except _Moved:
            return  # answered by the large lane
        except FetchTimeout as err:
            delay = self.penalties.offend(uid)
            report = partial(
                self.ratelog,
                uid,
                logging.WARNING,
                "%d: dtprobed: %s; uid %d refused for %.1f s",
                request.tid,
                err.reason,
                uid,
                delay,
            )
            result = -errno.EINVAL
        except RequestRejected as err:
            # The client's fault: the parser's (or our check's) message, at WARNING.
            report = partial(
                self.ratelog, uid, logging.WARNING, "%d: dtprobed: %s", request.tid, err.reason
            )
            result = -errno.EINVAL
        except ChildFailed as err:
            if job.in_parser:
                # The parser timed out or crashed on this request: its sender is
                # penalised, not the lane (the next sender gets a fresh child at once).
                delay = self.penalties.offend(uid)
                penalty = f"; uid {uid} refused for {delay:.1f} s"
            else:
                penalty = ""  # the stash writer broke: nobody's fault we know of
            report = partial(
                self.ratelog,
                uid,
                logging.ERROR,
                "%d: dtprobed: request failed, child broke: %s%s",
                request.tid,
                err,
                penalty,
            )
            result = -errno.EINVAL
            job.heavy = True
        except StashError as err:
            if err.errno == errno.EDQUOT:  # the caller's (or the stash's) share is used up
                what, level = "stash quota refused the registration (EDQUOT)", logging.WARNING
            else:
                what, level = (
                    f"cannot stash it ({errno.errorcode.get(err.errno, err.errno)})",
                    (logging.ERROR),
                )
            report = partial(
                self.ratelog, uid, level, "%d: dtprobed: %s: %s", request.tid, what, err
            )
            result = -errno.EINVAL
        except DtprobedError as err:
            report = partial(
                self.ratelog,
                uid,
                logging.ERROR,
                "%d: dtprobed: %s: %s",
                request.tid,
                type(err).__name__,
                err,
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
            if not job.moved:
                self._release(job)
        job.dof = b""
        _safe_reply(job.reply, result)
        report()
        if job.heavy:
            trim_heap()

    # --- ADDDOF -------------------------------------------------------------------

    def _fetch_remote(self, job: _Job, meanwhile: Callable[[], object] | None = None) -> bytes:
        """FUSE mode: the caller's DOF, fetched by a helper process within its time bound;
        *meanwhile* runs while the helper reads."""
        request, uid = job.request, job.request.uid
        address = helper_dof_address(request.helper)
        max_size = self.fairness.max_dof_size
        limit = SMALL_DOF - 1 if job.lane == "small" else max_size
        data = self._fetch.fetch(
            request.tid, uid, address, max_size=max_size, stream_limit=limit, meanwhile=meanwhile
        )
        loadsz = check_dof_header(data[: DOF_HDR.size], max_size)
        if job.lane == "small" and loadsz >= SMALL_DOF:
            self._move_to_large(job, loadsz)
        if job.loadsz and loadsz != job.loadsz:
            raise RequestRejected(
                errno.EINVAL, f"dofh_loadsz changed from {job.loadsz} to {loadsz} while fetched"
            )
        if len(data) != loadsz:
            raise RequestRejected(errno.EINVAL, f"fetched {len(data)} of {loadsz} bytes of DOF")
        return data

    def _move_to_large(self, job: _Job, size: int) -> None:
        """Hand *job* to the large lane (its bytes reserved there first); raises _Moved."""
        uid = job.request.uid
        self._release(job)
        refused = self._hold(job, "large", size)
        if refused:
            raise RequestRejected(errno.EINVAL, refused)
        job.lane = "large"
        if job.request.remote:
            job.loadsz = size
        else:
            job.size = size
        try:
            refused = self._lanes["large"].submit(uid, partial(self._run, job))
        except LaneClosed:
            refused = "the daemon is shutting down"
        if refused:
            raise RequestRejected(errno.EINVAL, refused)
        job.moved = True
        raise _Moved

    def _adddof(self, job: _Job) -> tuple[int, Callable[[], object]]:
        """The generation, and the log lines to write once the client has it.

        The caller's /proc reads overlap the waits for its children: in FUSE
        mode they run while the fetch helper reads the DOF, in CUSE mode while
        the parser parses.
        """
        request, uid = job.request, job.request.uid
        started = time.monotonic()
        penalty = self.penalties.remaining(uid)
        if penalty > 0:  # queued before its sender was penalised
            raise RequestRejected(errno.EINVAL, f"uid {uid} is refused for another {penalty:.1f} s")
        helper = request.helper  # 80 bytes: the device layer checked it
        fields = DOF_HELPER.unpack_from(helper)
        dof_addr: int = fields.dof
        identified: list[Caller] = []

        def identify_caller() -> None:
            if not identified:
                identified.append(identify(request.tid, dof_addr))

        try:
            if request.remote:
                job.dof = self._fetch_remote(job, identify_caller)
                size = len(job.dof)
                if job.lane == "large" and not job.held:
                    refused = self._hold(job, "large", size)
                    if refused:
                        raise RequestRejected(errno.EINVAL, refused)
            else:
                job.dof = request.dof
                size = len(job.dof)
            if job.lane == "small" and self._parse_meter.heavy(uid):
                self._move_to_large(job, size)  # it used the small parser a lot lately
            parser = self._large_parser if job.lane == "large" else self._small_parser
            parse_started = time.monotonic()
            job.in_parser = True
            try:
                # requester: a fork child's identical request is answered from the parse cache
                result = parser.parse_result(
                    helper, job.dof, meanwhile=identify_caller, requester=request.tid
                )
            finally:
                self._parse_meter.add(uid, time.monotonic() - parse_started)
            job.in_parser = False
            parsed = time.monotonic()
            if not identified:  # a Parser implementation that answered without running it
                identify_caller()
        except BaseException:
            for caller in identified:
                caller.close()
            raise
        caller = identified[0]
        try:
            # tracepoints in the DOF's own file, or (anonymous DOF) in unlinked private code
            gen = self._commit(
                caller,
                helper,
                [RawBlock(0, job.dof)],
                result,
                caller.dof_object,
                owner=_owner(request),
            )
        finally:
            caller.close()
        job.heavy = (
            size >= TRIM_AFTER_BYTES
            or len(result.records) >= TRIM_AFTER_RECORDS
            or argument_bytes(result.records) >= TRIM_AFTER_BYTES  # a small DOF, decoded big
        )
        what = f"module {_module_name(fields.mod)}"
        return gen, self._report(
            uid, caller, gen, what, len(result.probes), f"{size} bytes of DOF", started, parsed
        )

    # --- HASUSDT ------------------------------------------------------------------

    def _hasusdt(self, job: _Job) -> tuple[int, Callable[[], object]]:
        """Register the ``.note.usdt`` object that ``request.address`` lies in.

        Two exchanges with the sandboxed parser, which alone interprets the
        object: the ELF phase locates ``.note.usdt`` and ``.rodata`` (it reads
        headers through bounded ``pread``s we answer); we read those two
        sections once, and the parser parses exactly those bytes, which are
        also what the stash keeps as the raw blocks (so a reparse parses them
        again, with no file).
        """
        request = job.request
        started = time.monotonic()
        caller, obj = identify_object(request.tid, request.address)
        try:
            job.in_parser = True  # only the parser can break in here (reads raise OSError)
            found = parse_object_notes(
                self._small_parser,
                lambda size: self._large_parser if size >= SMALL_DOF else self._small_parser,
                obj.module,
                obj.first.start,
                obj.size,
                partial(_pread, obj.fd),
                requester=request.tid,
            )
            job.in_parser = False
            parsed = time.monotonic()
            where, result = found.where, found.result
            blocks = [
                RawBlock(where.notes_addr, found.notes),
                RawBlock(where.rodata_addr, found.rodata),
            ]
            gen = self._commit(
                caller,
                found.helper,
                blocks,
                result,
                (caller.dev, caller.ino),
                owner=_owner(request),
            )
        finally:
            obj.close()
            caller.close()
        sizes = f"{len(found.notes) + len(found.rodata)} bytes of notes and .rodata"
        return gen, self._report(
            request.uid,
            caller,
            gen,
            f"object {obj.module}",
            len(result.probes),
            sizes,
            started,
            parsed,
        )

    def _commit(
        self,
        caller: Caller,
        helper: bytes,
        raw: list[RawBlock],
        result: ParseResult,
        object_key: tuple[int, int] | None,
        *,
        caught_up: bool = False,
        owner: object = _UNREAD,
    ) -> int:
        """Check the tracepoints, stash the registration, watch the process; the generation.

        *owner* (per-uid stash quotas): the caller's fsuid as its request header
        gave it, else ``_UNREAD`` (catch-up: read from ``/proc``, before the
        liveness check, so it is this process's).
        """
        self._watcher.settle(caller.pid)
        caller.space.check_tracepoints(result.tracepoint_addrs(), object_key=object_key)
        if owner is _UNREAD:
            owner = fsuid_of(caller.pid)  # per-uid stash quotas
        if not caller.still_alive():
            raise RequestRejected(errno.EINVAL, f"process {caller.pid} exited")
        uid = owner if isinstance(owner, int) else None
        gen = self._register(caller, helper, raw, result.records, uid, caught_up=caught_up)
        self._watcher.watch(caller.pid, caller.take_pidfd())
        return gen

    def _register(
        self,
        caller: Caller,
        helper: bytes,
        raw: list[RawBlock],
        records: list[ResultRecord],
        uid: int | None,
        *,
        caught_up: bool = False,
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
            uid=UNKNOWN_UID if uid is None else uid,
            caught_up=caught_up,
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

    def _report(
        self,
        uid: int,
        caller: Caller,
        gen: int,
        what: str,
        probes: int,
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
            self.ratelog(
                uid,
                logging.INFO,
                "%d: registered generation %d: %s, %d-%d, %d probes, %s (%.1f ms)",
                caller.pid,
                gen,
                what,
                caller.dev,
                caller.ino,
                probes,
                sizes,
                (done - started) * 1000,
            )

        return report

    # --- REMOVE -------------------------------------------------------------------

    def _remove(self, request: HelperRequest) -> tuple[int, Callable[[], object]]:
        hook = self.ambiguous_remove
        if hook is not None and request.gen in AMBIGUOUS_GENS:
            # 0 or -1: what a constructor that got no answer holds; from a process
            # that catch-up registered, it names no generation of ours
            try:
                pid = tgid_of(request.tid)
            except RequestRejected:
                pid = 0
            removed = hook(pid) if pid else None
            if removed is not None:
                return 0, partial(
                    log.info,
                    "%d: REMOVE(%d) from a caught-up process: %d unmapped registrations removed",
                    pid,
                    request.gen,
                    removed,
                )
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

    # --- catch-up (dtprobed.daemon.catchup; on the maintenance thread) ---------------

    def catch_up_locate(
        self, module: str, first_start: int, size: int, read: Callable[[int, int], bytes]
    ) -> NotesLocation:
        """Where an object's ``.note.usdt`` or ``.SUNW_dof`` lies (the large lane's parser).

        Catch-up uses the large lane's parser throughout, so the small lane's
        registrations never wait behind a scan.
        """
        return self._large_parser.locate_notes(
            notes_helper(module, first_start), size, read, dof=True
        )

    def catch_up_notes(self, pid: int, address: int) -> int:
        """Register, on *pid*'s behalf, the notes object *address* lies in, as HASUSDT does."""
        caller, obj = identify_object(pid, address)
        try:
            found = parse_object_notes(
                self._large_parser,
                lambda _size: self._large_parser,
                obj.module,
                obj.first.start,
                obj.size,
                partial(_pread, obj.fd),
            )
            blocks = [
                RawBlock(found.where.notes_addr, found.notes),
                RawBlock(found.where.rodata_addr, found.rodata),
            ]
            return self._commit(
                caller, found.helper, blocks, found.result, (caller.dev, caller.ino), caught_up=True
            )
        finally:
            obj.close()
            caller.close()

    def catch_up_dof(
        self,
        pid: int,
        module: str,
        load_base: int,
        dof_addr: int,
        max_size: int,
        key: tuple[int, int],
    ) -> int:
        """Register, on *pid*'s behalf, the DOF at *dof_addr* in object *key*, as old drti did.

        The ``dof_helper_t`` is what drti's constructor built: ``dofhp_mod`` the
        object's basename, ``dofhp_addr`` its load base (0 for ET_EXEC),
        ``dofhp_dof`` the section's run-time address.  The DOF is fetched from
        the process's memory by a fetch helper (a page on a stalled file system
        cannot hang this thread), at most *max_size* bytes (the section's size).
        """
        uid = fsuid_of(pid)
        data = self._fetch.fetch(
            pid,
            UNKNOWN_UID if uid is None else uid,
            dof_addr,
            max_size=self.fairness.max_dof_size,
            stream_limit=max_size,
        )
        loadsz = check_dof_header(data[: DOF_HDR.size], self.fairness.max_dof_size)
        if loadsz > max_size or len(data) != loadsz:
            raise RequestRejected(
                errno.EINVAL, f"DOF at {dof_addr:#x}: loadsz {loadsz} does not fit its section"
            )
        name = module.encode("utf-8", "surrogateescape")[: DTRACE_MODNAMELEN - 1]
        helper = DOF_HELPER.pack(name.ljust(DTRACE_MODNAMELEN, b"\0"), load_base, dof_addr)
        caller = identify(pid, dof_addr)
        try:
            if (caller.dev, caller.ino) != key:
                raise RequestRejected(
                    errno.EINVAL, f"DOF at {dof_addr:#x} is not in object {key[0]}-{key[1]}"
                )
            result = self._large_parser.parse_result(helper, data)
            # the DOF lies in the object's file: its tracepoints must be in that file's code
            return self._commit(caller, helper, [RawBlock(0, data)], result, key, caught_up=True)
        finally:
            caller.close()

    def remove_generation(self, pid: int, gen: int) -> bool:
        """Remove one generation of *pid* (catch-up undoing, or an unmapped object's)."""
        return bool(self._writer_call(lambda: int(self._writer.remove(pid, gen))))

    # --- exits --------------------------------------------------------------------

    def prune_exited(self, pid: int) -> None:
        """``ExitWatcher`` callback: drop everything *pid* registered."""
        started = time.monotonic()
        self._writer_call(lambda: _done(partial(self._writer.remove_pid, may_defer=True), pid))
        log.info("%d: pruned: process exited (%.1f ms)", pid, (time.monotonic() - started) * 1000)

    def close(self) -> None:
        """Refuse new requests and finish (answer) the queued ones."""
        with self._lock:
            self._closed = True
        self._lanes["small"].shutdown()  # may move jobs on to the large lane: first
        self._lanes["large"].shutdown()
        self._fetch.close()


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


def _owner(request: HelperRequest) -> object:
    """The uid a request's registration is counted against: the fsuid the kernel put
    in its header (the calling thread's, at the call), or ``_UNREAD`` if unknown."""
    return request.uid if request.uid >= 0 else _UNREAD


def _safe_reply(reply: Reply, result: int) -> None:
    try:
        reply(result)
    except Exception:
        # The device is going away or the request was interrupted: nothing to tell.
        log.debug("reply %d could not be sent", result, exc_info=True)
