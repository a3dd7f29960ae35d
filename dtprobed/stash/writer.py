"""The stash writer child: the only process that writes under the state directory.

    python -m dtprobed.stash.writer --state-dir DIR [--max-generations N]
        [--max-probes-per-pid N] [--max-probes-per-uid N] [--max-probes-total N]
        [--max-raw-bytes-per-pid N] [--max-raw-bytes-per-uid N] [--max-raw-bytes-total N]
        [--progress-interval SECONDS] [--lock-dir DIR] [--debug]

It reads :mod:`common.stash_protocol` command frames on stdin (fd 0) and
answers each with exactly one reply frame on stdout (fd 1), preceded by its
log lines as ``Log`` frames (bounded; DEBUG only with ``--debug``): it never
writes a log of its own.  Every frame is
hostile input: the frame size is bounded before it is read, the body must
decode as a command (schema bounds), and the record stream is re-checked
(grammar, names, counts, quotas) by :class:`~dtprobed.stash.store.Stash` before the
first write.  An operation that fails answers ``Failure(errno, message)`` and
leaves nothing behind; a frame that breaks the protocol ends the process with
status 3 (the supervisor restarts it).  At start-up it recovers the tree left
by a killed predecessor (:meth:`Stash._recover`) and rebuilds its index, then
sends ``Started`` before it reads a command.  While a command (or the
start-up) works, it sends a ``Progress`` frame at most every
``--progress-interval`` seconds of advancing work, so the daemon's silence
timeout measures a stuck writer, not a large request.  After each command it
lets go of the command's memory (the decoded frame is dropped before the reply
is written, then ``gc`` and glibc's ``malloc_trim(0)`` after a large one), so
one hostile request does not leave the writer at its peak size.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import gc
import logging
import os
import select
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Final

from common.argtypes import positive_seconds
from common.errors import PeerClosed, ProtocolError, StashError
from common.framing import FrameDecoder, FrameEncoder
from common.process_name import set_process_name
from common.stash_protocol import (
    MAX_COMMAND_FRAME,
    MAX_LOG_MESSAGE,
    MAX_LOG_RECORDS,
    MAX_PRIORITY_FRAME,
    PRIORITY_MAX_PROBES,
    PRIORITY_MAX_RECORDS,
    Busy,
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
    Remove,
    Removed,
    RemovePid,
    ReparseScan,
    Started,
    StashCommand,
    StashReply,
    Verify,
    WriteReparsed,
    Yield,
    add_quota_arguments,
    quotas_from_args,
)
from dtprobed.oslib.fdio import read_exactly, write_all
from dtprobed.stash.layout import mapping_key
from dtprobed.stash.store import DEFAULT_LOCK_DIR, RemovalDeferred, Stash
from dtprobed.stash.store import Progress as ProgressMeter

EXIT_PROTOCOL: Final = 3
EXIT_START: Final = 4
DEFAULT_PROGRESS_INTERVAL: Final = 0.25
#: Commands whose frame is at least this large are followed by gc + malloc_trim.
TRIM_AFTER_BYTES: Final = 1 << 20
#: ... or after a command that wrote or removed this many files (Progress ticks)
TRIM_AFTER_FILES: Final = 4096
log = logging.getLogger("dtprobed.stash_writer")
#: Every frame to the daemon is written under this lock: Progress frames may come
#: from the progress thread (Progress.bounded) while the main thread logs.
_OUT = threading.Lock()


def send_frame(fd: int, frame: bytes | bytearray | memoryview) -> None:
    with _OUT:
        write_all(fd, frame)


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)`` (give freed heap back to the kernel), or a no-op."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def run() -> None:
        trim(0)

    return run


class Route:
    """Where the current command's ``Log`` and ``Progress`` frames go: the pipe its
    reply goes to (the main one, or the priority channel's)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd


def progress_sender(route: Route | int) -> Callable[[int, str], None]:
    """A :class:`~dtprobed.stash.store.Progress` report that writes ``Progress`` frames."""
    encoder = FrameEncoder()
    where = route if isinstance(route, Route) else Route(route)

    def report(done: int, what: str) -> None:
        send_frame(where.fd, encoder.encode(Progress(done=done, what=what[:64])))

    return report


def may_interleave(stash: Stash, cmd: StashCommand) -> bool:
    """Whether *cmd* may run at a yield point of the long command in progress.

    Never for the same process (or, for a Register, the same mapping: its raw
    file in ``stash/dof`` may be the one the long command is writing), and only
    when small: what interleaves delays the long command by its own cost.
    """
    assert stash.busy is not None
    pid, key = stash.busy
    match cmd:
        case Register(reg=reg, records=records):
            return (
                reg.pid != pid
                and mapping_key(reg.dev, reg.ino) != key
                and len(records) <= PRIORITY_MAX_RECORDS
            )
        case Remove(pid=other) | RemovePid(pid=other):
            return other != pid and stash.probes_of(other) <= PRIORITY_MAX_PROBES
    return False


class PriorityChannel:
    """The writer's end of the priority channel (``--priority-fds``).

    Commands on it are answered on its own reply pipe, between two commands of
    the main pipe (first, if both wait) and at the yield points of a long
    Register or RemovePid (:attr:`Stash.interleave`): there, a command that
    :func:`may_interleave` runs at once, any other is answered ``Busy``.
    """

    def __init__(self, stash: Stash, rfd: int, wfd: int, route: Route) -> None:
        self.stash = stash
        self.rfd, self.wfd = rfd, wfd
        self.route = route
        self._decoder: FrameDecoder[StashCommand] = FrameDecoder(StashCommand, MAX_PRIORITY_FRAME)
        self._encoder = FrameEncoder()
        self._poll = select.poll()
        self._poll.register(rfd, select.POLLIN)

    def waiting(self, timeout_ms: int = 0) -> bool:
        return bool(self._poll.poll(timeout_ms))

    def read(self) -> StashCommand:
        """The next command; :class:`PeerClosed` when the daemon closed the channel."""
        return self._decoder.read(lambda n: read_exactly(self.rfd, n))

    def answer(self, reply: StashReply) -> None:
        send_frame(self.wfd, self._encoder.encode(reply))

    def serve_one(self, logs: PipeLogHandler | None) -> None:
        """A command between two main ones: its Log and Progress frames go with its reply."""
        cmd = self.read()
        main_fd = self.route.fd
        self.route.fd = self.wfd
        if logs is not None:
            logs.fd = self.wfd
            logs.reset()
        try:
            self.stash.progress.begin(type(cmd).__name__)
            reply = handle(self.stash, cmd)
            del cmd
            self.answer(reply)
        finally:
            self.route.fd = main_fd
            if logs is not None:
                logs.fd = main_fd

    def interleave(self) -> None:
        """:attr:`Stash.interleave`: run the command waiting here, if it may."""
        if not self.waiting():
            return
        try:
            cmd = self.read()
        except PeerClosed:
            self.stash.interleave = None  # the daemon is going: finish the long one
            return
        stash = self.stash
        if isinstance(cmd, Yield):
            stash.request_deferral()
            reply: StashReply = Done()
        elif may_interleave(stash, cmd):
            reply = stash.run_interleaved(functools.partial(handle, stash, cmd))
        else:
            reply = Busy()
        del cmd
        self.answer(reply)


def handle(stash: Stash, cmd: StashCommand) -> StashReply:
    """Run one command; errors become a Failure reply (never an exception)."""
    try:
        match cmd:
            case Register(reg=reg, records=records):
                return Generation(gen=stash.register(reg, records))
            case Remove(pid=pid, gen=gen):
                return Removed(existed=stash.remove(pid, gen))
            case RemovePid(pid=pid, may_defer=may_defer):
                try:
                    stash.remove_pid(pid, may_defer=may_defer)
                except RemovalDeferred as why:
                    log.debug("removal deferred: %s", why)
                    return Deferred()
                return Done()
            case Yield():
                return Done()  # between commands: nothing in progress to stop
            case PruneDead():
                return Pids(pids=stash.prune_dead())
            case ReparseScan(force=force, offset=offset):
                items, next_offset = stash.reparse_scan_page(force, offset)
                return Items(items=items, next_offset=next_offset)
            case WriteReparsed(item=item, records=records):
                stash.write_reparsed(item, records)
                return Done()
            case Verify():
                return Problems(problems=[p[:4096] for p in stash.verify()[:65536]])
    except StashError as err:
        return Failure(
            errno=err.errno if 0 < err.errno < 4096 else errno.EIO, message=str(err)[:4096]
        )
    except OSError as err:
        code = err.errno if err.errno and 0 < err.errno < 4096 else errno.EIO
        return Failure(errno=code, message=f"{type(cmd).__name__}: {err}"[:4096])
    raise AssertionError(f"unhandled command {cmd!r}")


class PipeLogHandler(logging.Handler):
    """Log records as :class:`Log` frames on the reply pipe: the daemon logs them.

    At most :data:`MAX_LOG_RECORDS` per command (:meth:`reset` starts a
    command; start-up counts as one), then one note that the rest were
    suppressed.  A failed write (the daemon is gone) is dropped silently.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.count = 0
        self._encoder = FrameEncoder()
        self.setFormatter(logging.Formatter("%(message)s"))

    def reset(self) -> None:
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.count > MAX_LOG_RECORDS:
            return
        self.count += 1
        level = min(max(record.levelno, logging.DEBUG), logging.CRITICAL)
        if self.count > MAX_LOG_RECORDS:
            message, level = "further log lines of this command suppressed", logging.WARNING
        else:
            try:
                message = self.format(record)
            except Exception:  # a bad format string must not end the writer
                message = f"unformattable log record {record.msg!r}"
        frame = self._encoder.encode(Log(level=level, message=message[:MAX_LOG_MESSAGE]))
        with contextlib.suppress(OSError):
            send_frame(self.fd, frame)


def serve(
    stash: Stash,
    rfd: int,
    wfd: int,
    logs: PipeLogHandler | None = None,
    priority: PriorityChannel | None = None,
) -> None:
    decoder: FrameDecoder[StashCommand] = FrameDecoder(StashCommand, MAX_COMMAND_FRAME)
    encoder = FrameEncoder()
    trim = _malloc_trim()
    both = select.poll()
    both.register(rfd, select.POLLIN)
    if priority is not None:
        both.register(priority.rfd, select.POLLIN)
        stash.interleave = priority.interleave
    while True:
        # the priority channel first when both pipes have a command
        while priority is not None:
            if priority.rfd not in {fd for fd, _ in both.poll()}:
                break  # a command (or EOF) on the main pipe
            try:
                priority.serve_one(logs)
            except PeerClosed:
                return
        size = 0

        def read(n: int) -> bytes:
            nonlocal size
            size += n
            return read_exactly(rfd, n)

        try:
            cmd = decoder.read(read)
        except PeerClosed:
            return
        if logs is not None:
            logs.reset()
        stash.progress.begin(type(cmd).__name__)
        reply = handle(stash, cmd)
        del cmd  # the decoded frame (records, raw bytes) goes before the reply is sent
        send_frame(wfd, encoder.encode(reply))
        del reply
        # a big frame, or a big removal (its listings of parsed/): the heap they grew
        if size >= TRIM_AFTER_BYTES or stash.progress.done >= TRIM_AFTER_FILES:
            gc.collect()
            trim()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dtprobed.stash.writer", description=__doc__)
    p.add_argument("--state-dir", required=True)
    add_quota_arguments(p)
    p.add_argument(
        "--progress-interval",
        type=positive_seconds,
        default=DEFAULT_PROGRESS_INTERVAL,
        help="longest gap between Progress frames of advancing work (default %(default)s)",
    )
    p.add_argument("--debug", action="store_true", help="send DEBUG log lines too (dtprobed -d)")
    p.add_argument(
        "--lock-dir",
        default=DEFAULT_LOCK_DIR,
        help="0700 directory of the writers' locks (default %(default)s)",
    )
    p.add_argument(
        "--priority-fds",
        type=_fd_pair,
        default=None,
        metavar="READ,WRITE",
        help="the priority channel's pipes (set by the daemon; see docs/protocol.md)",
    )
    return p


def _fd_pair(text: str) -> tuple[int, int]:
    read_fd, _, write_fd = text.partition(",")
    if not (read_fd.isdigit() and write_fd.isdigit()):
        raise argparse.ArgumentTypeError(f"expected READ,WRITE fd numbers, not {text!r}")
    return int(read_fd), int(write_fd)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # the children never write a log themselves: every line goes to the daemon
    logs = PipeLogHandler(1)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(logs)
    root.setLevel(logging.DEBUG if args.debug else logging.INFO)
    set_process_name(b"dtprobed-stash")
    os.umask(0o022)  # modes are then exactly the 0755/0644 we pass
    try:
        quotas = quotas_from_args(args)
    except (TypeError, ValueError) as err:  # msgspec's bounds (e.g. above 2^24 probes)
        log.error("cannot start: bad quota: %s", err)
        return EXIT_START
    route = Route(1)
    report = progress_sender(route)
    meter = ProgressMeter(report, args.progress_interval)
    try:
        report(0, "starting")  # ends the host's start grace: -t applies from here
    except OSError:
        return 0
    try:
        # takes the writer lock, then recovers what a killed predecessor left
        stash = Stash(args.state_dir, quotas, lock_dir=args.lock_dir, progress=meter)
    except StashError as err:
        log.error("cannot start: %s", err)
        return EXIT_START
    except OSError as err:  # e.g. the state directory is not a directory
        log.error("cannot start: %s: %s", args.state_dir, err)
        return EXIT_START
    try:
        usage = stash.usage
        started = Started(pids=stash.process_count, probes=usage.probes, raw_bytes=usage.raw)
        try:
            send_frame(1, FrameEncoder().encode(started))
        except OSError:
            return 0  # the daemon went away during our start-up
        gc.collect()
        _malloc_trim()()
        priority = None
        if args.priority_fds is not None:
            read_fd, write_fd = args.priority_fds
            priority = PriorityChannel(stash, read_fd, write_fd, route)
        serve(stash, 0, 1, logs, priority)
    except ProtocolError as err:
        log.error("protocol violation from the daemon: %s", err)
        return EXIT_PROTOCOL
    finally:
        stash.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
