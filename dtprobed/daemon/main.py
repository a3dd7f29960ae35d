"""``dtprobed``: the DTrace USDT helper daemon (command line, start-up, main loop).

Start-up order follows upstream's daemon: set up the helper device
first (so bad options, a missing ``/dev/fuse`` and a device already served by
a live daemon fail at once, before the stash is touched), start the stash
writer (which recovers an interrupted operation), prune dead processes,
reparse what has an outdated parsed version (one mapping per exchange), then
tell the service manager ``READY=1`` and serve.  Processes still alive in the
stash are watched from then on like new registrations.  None of these steps is
bounded by ``-t`` as a whole: the writer reports progress (recovery and index
rebuild of a stash at its quotas' maximum take seconds), ``-t`` bounds only its
silence, and every frame of it (and every reparsed mapping) feeds the watchdog
until READY=1 (``WATCHDOG=1`` with ``EXTEND_TIMEOUT_USEC``).

Once ready, the daemon catches up (:mod:`dtprobed.daemon.catchup`, unless
``--no-catch-up``): it registers, on their behalf, the probes of running
programs that started while no daemon served the helper, as a maintenance job.

Signals: SIGTERM and SIGINT stop the daemon cleanly (queued requests
answered, children stopped, device removed, stash left intact, ``STOPPING=1``,
exit 0).  SIGHUP runs a catch-up (what ``dtprobed-stash catch-up`` and the
unit's ``ExecReload=`` send; upstream's daemon stops on SIGHUP, we do not: a
reload that stopped the helper would leave every program started meanwhile
without probes).  SIGUSR2 forces a reparse of the whole stash (upstream only
does this in its test mode; here it is always on).

The main loop only reads the device, feeds the watchdog (``WATCHDOG=1``) and
schedules housekeeping; it never waits for the stash.  The periodic prune
(every :data:`PRUNE_INTERVAL` s), the forced reparse and catch-up (one writer
exchange per object) run on one *maintenance* thread (:class:`Maintenance`),
one job at a time.  A reparse
goes one mapping at a time — one parse, then one stash-writer exchange — and
the writer client serialises exchanges with a lock, so registrations get the
writer between two mappings of even a very long reparse, and the device
keeps being served and the watchdog fed throughout.  A mapping that vanished
(its process pruned or its generation removed) between the scan and its turn
is skipped.  On stop the maintenance thread finishes the mapping in hand and
leaves the rest (a reparse is not resumed; the next start-up reparses
whatever is still outdated); a job still running after
:data:`MAINTENANCE_STOP_WAIT` has the device closed under it (it may be
waiting for our own FUSE helper, which the stopped main loop no longer
answers).

Exit status: 0 after a clean stop; 1 fatal (bad options, unusable or already
served device, unusable state directory) — the unit's
``RestartPreventExitStatus=1`` keeps systemd from looping on it; 2 when a
restart may help (the stash writer cannot be started: 5 failures in a row; a
writer that breaks on one client's request fails that request only).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import queue
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

from common.argtypes import positive_int, positive_seconds
from common.errors import DtprobedError, RequestRejected, StashError
from common.limits import (
    DEFAULT_MAX_DOF_SIZE,
    DEFAULT_MAX_PROBES,
    DEFAULT_MAX_PROVIDERS,
    DEFAULT_MAX_TRACEPOINTS,
    ParseLimits,
)
from common.records import ResultRecord
from common.stash_protocol import (
    ReparseItem,
    add_quota_arguments,
    quotas_from_args,
)
from dtprobed.children.parsecache import ParseCache
from dtprobed.children.parser import ParserChild, ParseResult
from dtprobed.children.writer import DEFAULT_BACKSTOP, StashWriterChild, WriterCommandFailed
from dtprobed.daemon import fairness, statedir, unmapped
from dtprobed.daemon.catchup import CatchUp, boot_ticks
from dtprobed.daemon.exitwatch import ExitWatcher
from dtprobed.daemon.logsetup import setup_logging
from dtprobed.daemon.notify import Notifier
from dtprobed.daemon.receiver import MAX_QUEUED_BYTES, Receiver
from dtprobed.device.cuse import SEQUENCE_EXPIRY_TIMEOUTS
from dtprobed.device.errors import DeviceError, DeviceGone
from dtprobed.device.opener import open_device
from dtprobed.device.request import HelperRequest
from dtprobed.oslib.procfs import start_time_of
from dtprobed.stash import rundir

EXIT_OK: Final = 0
EXIT_FATAL: Final = 1
EXIT_RESTART: Final = 2

DEFAULT_DEVNAME: Final = "dtrace/helper"
DEFAULT_STATE_DIR: Final = "/run/dtrace"
#: sys.setswitchinterval for the daemon, in seconds (see main)
GIL_SWITCH_INTERVAL: Final = 0.001
DEFAULT_TIMEOUT: Final = 5.0
#: Prune dead processes this often, to catch what pidfds can't see (exec, pid reuse), and
#: drop objects their processes unmapped (``--prune-interval``).
PRUNE_INTERVAL: Final = 60.0
#: How long a stop waits for the maintenance job in hand (a reparse's mapping, a
#: catch-up object) before closing the device under it; and after that, before
#: leaving it behind.
MAINTENANCE_STOP_WAIT: Final = 1.0
MAINTENANCE_ABANDON_WAIT: Final = 5.0
#: Without a watchdog, start-up extends the service manager's start timeout this often.
STARTUP_PING: Final = 1.0
#: … by at least this much (each time; -t × 4 if longer).
STARTUP_EXTEND: Final = 30.0

log = logging.getLogger("dtprobed")

try:
    from importlib.metadata import version as _pkg_version

    VERSION = _pkg_version("dtprobed-py")
except Exception:  # not installed: running from a checkout
    VERSION = "0+unknown"


class UsageError(Exception):
    """Bad command line; the message is one line."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse exits 2 on a bad option; a typo must be fatal (exit 1) for systemd."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _ArgumentParser(
        prog="dtprobed",
        description="DTrace USDT helper daemon: receives DOF from programs over the helper "
        "device, parses it in a sandboxed child and keeps the DOF stash.",
    )
    ap.add_argument("-F", "--foreground", action="store_true", help="log to stderr")
    ap.add_argument("-d", "--debug", action="store_true", help="debug logging")
    ap.add_argument(
        "-n",
        "--devname",
        metavar="DEVNAME",
        help=f"device name under /dev (default {DEFAULT_DEVNAME})",
    )
    ap.add_argument("--device", metavar="PATH", help="absolute path of the helper device")
    ap.add_argument(
        "--device-mode",
        choices=("auto", "cuse", "fuse"),
        default="auto",
        help="CUSE character device, FUSE file, or CUSE when /dev/cuse works (default)",
    )
    ap.add_argument(
        "-s", "--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR, help="the stash root"
    )
    ap.add_argument(
        "-t",
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="bound on each exchange with a child (default 5)",
    )
    ap.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run the parser without its seccomp filter (debugging only)",
    )
    ap.add_argument(
        "--mount-ns-pid",
        type=positive_int,
        default=1,
        metavar="PID",
        help="FUSE mode: mount the helper in PID's mount namespace (default 1, the host's)",
    )
    ap.add_argument("--ready-fd", type=int, metavar="FD", help="write one byte to FD when ready")
    limits = ap.add_argument_group("parser limits (per DOF)")
    limits.add_argument("--max-dof-size", type=positive_int, default=DEFAULT_MAX_DOF_SIZE)
    limits.add_argument("--max-providers", type=positive_int, default=DEFAULT_MAX_PROVIDERS)
    limits.add_argument("--max-probes", type=positive_int, default=DEFAULT_MAX_PROBES)
    limits.add_argument("--max-tracepoints", type=positive_int, default=DEFAULT_MAX_TRACEPOINTS)
    quotas = ap.add_argument_group("stash quotas")
    add_quota_arguments(quotas)
    ap.add_argument(
        "--writer-backstop",
        type=positive_seconds,
        default=DEFAULT_BACKSTOP,
        metavar="SECONDS",
        help="bound on one whole stash-writer command that keeps reporting progress "
        f"(default {DEFAULT_BACKSTOP:g}; -t bounds its silence)",
    )
    ap.add_argument(
        "--no-catch-up",
        action="store_true",
        help="do not register running programs' probes at start-up (SIGHUP still does)",
    )
    ap.add_argument(
        "--prune-interval",
        type=positive_seconds,
        default=PRUNE_INTERVAL,
        metavar="SECONDS",
        help="prune dead and exec'd processes and drop unmapped objects this often "
        f"(default {PRUNE_INTERVAL:g})",
    )
    fairness.add_arguments(ap)
    ap.add_argument("--version", action="version", version=f"dtprobed {VERSION}")
    return ap


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.devname is not None and args.device is not None:
        raise UsageError("-n/--devname and --device are mutually exclusive")
    if args.device is None:
        name = args.devname if args.devname is not None else DEFAULT_DEVNAME
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise UsageError(
                f"bad device name {name!r}: give a name under /dev, like dtrace/helper"
            )
        args.device = f"/dev/{name}"
    elif not os.path.isabs(args.device):
        raise UsageError(f"--device needs an absolute path, not {args.device!r}")
    if args.device_mode == "cuse" and not args.device.startswith("/dev/"):
        raise UsageError(f"CUSE mode needs a device path under /dev, not {args.device}")
    if not os.path.isabs(args.state_dir):
        args.state_dir = os.path.abspath(args.state_dir)
    try:
        args.limits = ParseLimits(
            max_dof_size=args.max_dof_size,
            max_providers=args.max_providers,
            max_probes=args.max_probes,
            max_tracepoints=args.max_tracepoints,
        )
        args.quotas = quotas_from_args(args)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    return args


def raise_nofile_limit() -> int:
    """One pidfd per registered process: lift the soft fd limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


class Daemon:
    """The running daemon: owns the device, the children, the watcher and the receiver."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.notifier = Notifier()
        self._exit_status: int | None = None
        self._exit_reason = ""
        self._stop_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.maintenance = Maintenance(self)
        self._next_startup_ping = 0.0
        self._run_dir: int | None = None  # /run/dtprobed: pid file, catch-up marker
        self._serving_since = 0  # boot ticks when the helper was set up

    # --- the watchdog during start-up -------------------------------------------------

    def _startup_alive(self) -> None:
        """Start-up advanced (a writer frame, a reparsed mapping): feed the watchdog.

        Until READY=1 the main loop does not run, so start-up itself sends
        WATCHDOG=1 (at the loop's interval) whenever it makes progress, with
        ``EXTEND_TIMEOUT_USEC`` so that a long but advancing start-up (a
        recovery or index rebuild of a stash at its quotas' maximum) is not
        cut off by ``TimeoutStartSec=``.  A stuck start-up sends nothing and
        fails by itself after -t (or the service manager's timeouts fire).
        """
        interval = self.notifier.watchdog_interval
        now = time.monotonic()
        if now < self._next_startup_ping:
            return
        self._next_startup_ping = now + (interval if interval else STARTUP_PING)
        extend = int(max(STARTUP_EXTEND, 4 * self.args.timeout) * 1e6)
        if interval:
            self.notifier.notify("WATCHDOG=1", f"EXTEND_TIMEOUT_USEC={extend}")
        else:
            self.notifier.notify(f"EXTEND_TIMEOUT_USEC={extend}")

    # --- stopping -------------------------------------------------------------------

    def request_stop(self, status: int, reason: str) -> None:
        """Make the main loop end with *status* (first caller wins); any thread."""
        with self._stop_lock:
            if self._exit_status is None:
                self._exit_status = status
                self._exit_reason = reason
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGUSR2:
            self.maintenance.post("reparse")  # lock-free: a queue put and a set add
        elif signum == signal.SIGHUP:
            self.maintenance.post("catch-up")
        else:
            self.request_stop(EXIT_OK, f"{signal.Signals(signum).name} received")

    # --- start-up -------------------------------------------------------------------

    def run(self) -> int:
        # Every path is absolute by now; leave the directory we were started
        # from (e.g. by install.sh) so a long-lived daemon does not pin it.
        os.chdir("/")
        nofile = raise_nofile_limit()
        log.debug("RLIMIT_NOFILE is %d", nofile)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(sig, self._on_signal)
        with contextlib.ExitStack() as stack:
            try:
                self._start(stack)
            except FatalStartup as err:
                log.error("%s", err)
                return err.status
            self._serve()
            self.notifier.stopping()
            log.info("stopping: %s", self._exit_reason)
        # ExitStack unwound: device removed, requests answered, children stopped.
        status = self._exit_status if self._exit_status is not None else EXIT_OK
        log.info("stopped (exit status %d)", status)
        return status

    def _start(self, stack: contextlib.ExitStack) -> None:
        args = self.args
        self.writer = StashWriterChild(
            args.state_dir,
            timeout=args.timeout,
            quotas=args.quotas,
            log=logging.getLogger("dtprobed.stash"),
            backstop=args.writer_backstop,
            on_progress=self._startup_alive,  # until READY=1
        )
        self.small_parser = self._parser()
        self.large_parser = self._parser()
        # Device first: a bad or already-served device is fatal before anything else.
        self._serving_since = boot_ticks()  # a program started later reaches us itself
        try:
            self.device = open_device(
                args.device_mode,
                args.device,
                self._handle,
                max_dof_size=args.limits.max_dof_size,
                log=logging.getLogger("dtprobed.device"),
                host_ns_pid=args.mount_ns_pid,
                # CUSE: partly fetched DOF is bounded like the receiver's queue, and an
                # abandoned sequence expires after SEQUENCE_EXPIRY_TIMEOUTS × -t.
                max_pending_bytes=MAX_QUEUED_BYTES,
                sequence_expiry=SEQUENCE_EXPIRY_TIMEOUTS * args.timeout,
            )
        except DeviceError as err:
            raise FatalStartup(EXIT_FATAL, f"cannot serve {args.device}: {err}") from err
        stack.callback(self.device.close)
        stack.callback(self.writer.stop)
        self._startup_alive()
        self.writer.start()  # recovery and index rebuild: progress, not bounded by -t
        self.small_parser.start()
        stack.callback(self.small_parser.stop)
        stack.callback(self.large_parser.stop)
        self.watcher = ExitWatcher(self._prune_exited)
        stack.callback(self.watcher.stop)
        self.receiver = Receiver(
            small_parser=self.small_parser,
            large_parser=self.large_parser,
            writer=self.writer,
            watcher=self.watcher,
            on_fatal=self.request_stop,
            **fairness.receiver_options(args, args.limits.max_dof_size),
        )
        self.device.ratelog = self.receiver.ratelog  # one log budget per uid
        stack.callback(self.receiver.close)  # runs before the watcher and children stop
        try:
            pruned = self.writer.prune_dead()
            if pruned:
                log.info("pruned %d dead or exec'd processes: %s", len(pruned), _pid_list(pruned))
            self._reparse(force=False)
        except DtprobedError as err:
            # upstream: a stash that can't be initialised or reparsed is fatal (exit 1)
            raise FatalStartup(
                EXIT_FATAL, f"cannot prepare the stash in {args.state_dir}: {err}"
            ) from err
        statedir.warn_if_not_in_memory(args.state_dir, log)  # once: tmpfs or a warning
        for pid in self._live_stash_pids():
            if not self.watcher.watch_pid(pid):
                self.receiver.prune_exited(pid)
        self.catch_up = CatchUp(
            self.receiver,
            remover=self.writer,
            device=args.device,
            state_dir=args.state_dir,
            max_dof_size=args.limits.max_dof_size,
            stopping=self.maintenance.stopping,
        )
        self.receiver.ambiguous_remove = self.catch_up.on_ambiguous_remove
        self._open_run_dir(stack)  # before the maintenance thread: closed after it stops
        self.watcher.start()
        self.maintenance.start()
        stack.callback(self._stop_maintenance)  # runs first: before the receiver closes
        self.writer.on_progress = None  # from now on the main loop feeds the watchdog
        self.notifier.ready()
        if args.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(args.ready_fd, b"R")
                os.close(args.ready_fd)
        log.info(
            "ready: serving %s (%s mode), state directory %s, %d processes watched",
            args.device,
            self.device.mode,
            args.state_dir,
            len(self.watcher),
        )
        self._write_pid_file(stack)
        if not args.no_catch_up:
            self.maintenance.post("start-up catch-up")

    def _open_run_dir(self, stack: contextlib.ExitStack) -> None:
        """Root's ``/run/dtprobed`` (rundir.py), closed only after the maintenance thread."""
        try:
            self._run_dir = rundir.open_run_dir()
        except OSError as err:
            log.warning(
                "no pid file in %s (dtprobed-stash catch-up won't find us): %s", rundir.RUN_DIR, err
            )
            return
        stack.callback(os.close, self._run_dir)

    def _write_pid_file(self, stack: contextlib.ExitStack) -> None:
        """``/run/dtprobed/daemon-$dev-$ino.pid`` for ``dtprobed-stash catch-up``."""
        run_dir = self._run_dir
        if run_dir is None:
            return
        try:
            name = rundir.pid_file_name(self.args.state_dir)
            start = start_time_of(os.getpid())
            rundir.write_atomically(run_dir, name, f"{os.getpid()} {start}\n".encode())
        except OSError as err:
            log.warning("cannot write the pid file in %s: %s", rundir.RUN_DIR, err)
            return

        def remove() -> None:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=run_dir)

        stack.callback(remove)

    def _stop_maintenance(self) -> None:
        """Stop the maintenance thread; if it hangs in a file system, close the device under it.

        Catch-up stats helper paths, and in FUSE mode our own helper is a file
        that only our main loop answers for, which has stopped by now: a stat
        in flight would wait for ever.  Closing the device aborts the FUSE
        connection, failing that request (ENOTCONN).  A thread waiting for some
        other file system is left behind (it is a daemon thread; exit does
        not wait for it).
        """
        if self.maintenance.stop(MAINTENANCE_STOP_WAIT):
            return
        log.warning(
            "maintenance thread still busy %.0f s after stop: closing the device under it",
            MAINTENANCE_STOP_WAIT,
        )
        self.device.close()
        if not self.maintenance.stop(MAINTENANCE_ABANDON_WAIT):
            log.warning("maintenance thread abandoned (a file system not answering?)")

    def _catch_up(self, *, start_up: bool = False) -> None:
        """One catch-up run (maintenance thread); its summary goes to the completion marker."""
        summary = self.catch_up.run(self._serving_since if start_up else None)
        run_dir = self._run_dir
        if run_dir is None:
            return
        try:
            data = json.dumps(summary.as_json()).encode()
            rundir.write_atomically(run_dir, rundir.marker_name(self.args.state_dir), data)
        except OSError as err:
            log.warning("cannot write the catch-up marker: %s", err)

    def _parser(self) -> ParserChild:
        return ParserChild(
            limits=self.args.limits,
            timeout=self.args.timeout,
            sandbox=not self.args.no_sandbox,
            log=logging.getLogger("dtprobed.parser"),
            # a fork child's re-registration (same bytes, same helper) skips the child
            cache=ParseCache(),
        )

    def _live_stash_pids(self) -> list[int]:
        """Processes with registrations in the stash (all alive after prune_dead)."""
        try:
            names = os.listdir(os.path.join(self.args.state_dir, "stash", "dof-pid"))
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def _reparse_one(self, item: ReparseItem) -> ParseResult:
        """Parse one stored mapping again: its DOF, or its notes and .rodata blocks."""
        if item.notes:
            notes, rodata = item.raw
            return self.large_parser.parse_note_blocks(
                item.helper, notes.base, notes.data, rodata.base, rodata.data
            )
        return self.large_parser.parse_result(item.helper, item.raw[0].data)

    def _reparse(self, *, force: bool, stopping: Callable[[], bool] = lambda: False) -> None:
        """Reparse outdated (or, forced, all) mappings, one exchange each.

        Each mapping is its own parse and its own writer exchange, so other
        users of the writer (registrations, exit pruning) get it in between.
        *stopping* is asked before each mapping: true ends the reparse early.
        """
        items = self.writer.reparse_scan(force)
        done = failed = gone = 0
        for index, item in enumerate(items, 1):
            if stopping():
                log.info("reparse stopped after %d of %d mappings", index - 1, len(items))
                break
            if self.writer.on_progress is not None:
                self.writer.on_progress()  # start-up: one mapping done is progress
            try:
                records: list[ResultRecord] | None = self._reparse_one(item).records
            except DtprobedError as err:
                level = logging.WARNING if isinstance(err, RequestRejected) else logging.ERROR
                log.log(
                    level,
                    "%d: cannot reparse %d-%d (ignored): %s",
                    item.pid,
                    item.dev,
                    item.ino,
                    err,
                )
                records = None
            try:
                self.writer.write_reparsed_records(item, records)
            except WriterCommandFailed as err:
                # the writer broke on this mapping (and was replaced): the mapping
                # stays unparsed, as after a failed parse; never fatal
                log.error(
                    "%d: cannot write the reparse of %d-%d: %s", item.pid, item.dev, item.ino, err
                )
                failed += 1
                continue
            except StashError as err:
                if err.errno not in (errno.ENOENT, errno.ESTALE):
                    raise
                # removed (exit, exec, REMOVE) between the scan and its turn: nothing to do
                log.debug(
                    "%d: %d-%d gone before its reparse: %s", item.pid, item.dev, item.ino, err
                )
                gone += 1
                continue
            if records is None:
                failed += 1
            else:
                done += 1
            log.debug(
                "%d: reparsed %d-%d (%d of %d)", item.pid, item.dev, item.ino, index, len(items)
            )
        if items or force:
            log.info(
                "reparse%s: %d mappings reparsed, %d failed%s",
                " (forced)" if force else "",
                done,
                failed,
                f", {gone} gone meanwhile" if gone else "",
            )

    # --- serving --------------------------------------------------------------------

    def _handle(self, request: HelperRequest, reply: Callable[[int], None]) -> None:
        self.receiver.handle(request, reply)

    def _prune_exited(self, pid: int) -> None:
        self.receiver.prune_exited(pid) if hasattr(self, "receiver") else self.writer.remove_pid(
            pid
        )

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        sel.register(self.device.fileno(), selectors.EVENT_READ)
        interval = self.notifier.watchdog_interval
        next_watchdog = time.monotonic() if interval else float("inf")
        next_prune = time.monotonic() + self.args.prune_interval
        try:
            while self._exit_status is None:
                now = time.monotonic()
                if now >= next_watchdog:
                    self.notifier.watchdog()
                    next_watchdog = now + interval  # type: ignore[operator]
                if now >= next_prune:
                    self.maintenance.post("prune")  # on the maintenance thread
                    next_prune = now + self.args.prune_interval
                timeout = max(0.0, min(next_watchdog, next_prune) - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            while self._wake_r.recv(4096):
                                pass
                    else:
                        self._serve_device()
        finally:
            sel.close()

    def _serve_device(self) -> None:
        try:
            while self.device.serve_once():
                pass
        except DeviceGone as err:
            self.request_stop(EXIT_RESTART, f"the helper device went away: {err}")
        except OSError as err:
            self.request_stop(EXIT_RESTART, f"reading the helper device failed: {err}")

    def _periodic_prune(self) -> None:
        try:
            pruned = self.writer.prune_dead()
        except DtprobedError as err:
            log.error("periodic prune failed: %s", err)
            return
        if pruned:
            log.info("pruned %d dead or exec'd processes: %s", len(pruned), _pid_list(pruned))
        # FUSE mode never sees a dlclose's REMOVE (docs/operations.md): unmapped.py
        dropped = unmapped.drop_unmapped(
            self.args.state_dir, self.writer, stopping=self.maintenance.stopping
        )
        log.debug("periodic prune done: %d unmapped objects dropped", len(dropped))

    def _forced_reparse(self) -> None:
        log.info("SIGUSR2: forced reparse of the whole stash")
        try:
            self._reparse(force=True, stopping=self.maintenance.stopping)
        except DtprobedError as err:
            log.error("forced reparse failed: %s", err)


class Maintenance:
    """The maintenance thread: runs the daemon's periodic prune, forced reparse and catch-up.

    Jobs are posted from the main loop or a signal handler (:meth:`post` only
    puts into a queue); a job already waiting is not queued twice (a second
    SIGUSR2 during a reparse queues one more reparse, a third adds nothing).
    Exceptions are logged; the thread carries on.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._jobs: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._waiting: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dtprobed-maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def post(self, job: str) -> None:
        if job in self._waiting:
            return
        self._waiting.add(job)
        self._jobs.put(job)

    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, timeout: float) -> bool:
        """Finish the mapping in hand, drop the rest; wait for the thread, up to *timeout* s.

        False if it is still running then (waiting for a file system: see
        :meth:`Daemon._stop_maintenance`).
        """
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                break
            self._waiting.discard(job)
            if self._stop.is_set():
                break
            try:
                if job == "prune":
                    self._daemon._periodic_prune()
                elif job == "reparse":
                    self._daemon._forced_reparse()
                elif job == "catch-up":
                    self._daemon._catch_up()
                elif job == "start-up catch-up":
                    self._daemon._catch_up(start_up=True)
            except Exception:
                log.exception("maintenance job %s failed (a bug)", job)


class FatalStartup(Exception):
    """Start-up cannot proceed; *status* is the exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _pid_list(pids: Sequence[int], limit: int = 20) -> str:
    text = " ".join(str(p) for p in pids[:limit])
    return text + (f" … (+{len(pids) - limit})" if len(pids) > limit else "")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"dtprobed: error: {err} (see dtprobed --help)", file=sys.stderr)
        return EXIT_FATAL
    setup_logging(foreground=args.foreground, debug=args.debug)
    # A thread decoding and checking a large answer holds the GIL; every other thread
    # (a small client's registration) waits up to this long each time it needs it back
    # after a system call: Python's 5 ms made the p99 of small registrations during a
    # 20000-probe one ~24 ms, 1 ms makes it ~20 (docs/performance.md).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        return Daemon(args).run()
    except Exception:
        log.exception("dtprobed: internal error")
        return EXIT_RESTART


if __name__ == "__main__":
    sys.exit(main())
