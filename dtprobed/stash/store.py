"""The stash writer's operations on the tree: register, remove, prune, reparse, recover.

The layout they keep is described in :mod:`dtprobed.stash.layout`.  Only the
writer process (:mod:`dtprobed.stash.writer`) uses this module.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from common.dof_abi import DOF_MAG_STRING, DOF_MAXSZ
from common.errors import ProtocolError, StashError
from common.grammar import ParsedProbe, StreamChecker, check_stream
from common.names import printable, probespec
from common.records import Provider, ResultRecord
from common.stash_format import (
    VERSION_BYTES,
    encode_probe_file,
    encode_record,
)
from common.stash_protocol import (
    REPLY_BUDGET,
    UNKNOWN_UID,
    RawBlock,
    Registration,
    ReparseItem,
    StashQuotas,
)
from dtprobed.oslib.dirfd import DirFd
from dtprobed.oslib.fdio import write_all
from dtprobed.oslib.procfs import current_exec_token, start_time_of
from dtprobed.stash.layout import (
    _OPEN_FILE,
    DIR_MODE,
    FILE_MODE,
    HELPER_SIZE,
    MAX_CAUGHT_UP_XATTR,
    MAX_EXEC_MAPPING,
    MAX_RAW_BLOCKS,
    RAW_PREFIX,
    XATTR_CAUGHT_UP,
    XATTR_EXEC_TOKEN,
    XATTR_START_TIME,
    XATTR_UID,
    exec_mapping_bytes,
    is_number,
    mapping_key,
    parse_caught_up,
    parse_exec_mapping,
    raw_name,
    read_small,
    shared_raw_name,
    split_key,
    split_shared_raw_name,
    split_spec,
)
from dtprobed.stash.verify import verify_tree

log = logging.getLogger("dtprobed.stash")

#: Recovery actions logged one per line; the rest are counted (the writer's Log
#: frames are bounded per command, and start-up counts as one).
_MAX_RECOVERY_LINES: Final = 32

#: Units of work (probe files written or removed) between two looks at the priority
#: channel while a long Register or RemovePid runs (Stash.interleave): ~0.5 ms here.
YIELD_EVERY: Final = 32
#: The same while the records of a long Register are checked (~0.75 µs each).
CHECK_YIELD_EVERY: Final = 1024
#: What a stash entry that is missing, or is not what the writer made there, fails with
_NOT_AS_WRITTEN: Final = frozenset(
    (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EINVAL, errno.EISDIR, errno.EPERM)
)
#: open(2) flags of a file made in a directory nothing names yet (Stash._write_new)
_CREATE_NEW: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

#: The u64 base that starts every raw file (upstream's ``[u64 base][data]``).
_BASE: Final = struct.Struct("<Q")


class RemovalDeferred(Exception):
    """A deferrable removal stopped for a registration (:meth:`Stash.remove_pid`)."""


def _block(raw: bytes) -> RawBlock:
    """A raw file's bytes as the block it holds (``RAW_PREFIX``-sized base, then data)."""
    return RawBlock(_BASE.unpack_from(raw)[0] if len(raw) >= _BASE.size else 0, raw[_BASE.size :])


def _unlink_quiet(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _no_tick() -> None:
    pass


def _remove_tree(dir_fd: int, name: str, tick: Callable[[], None] = _no_tick) -> None:
    """Remove *name* (file, link or whole directory) without following any symlink.

    Directories are opened ``O_NOFOLLOW|O_DIRECTORY`` and emptied through their
    fd (what ``shutil.rmtree(dir_fd=)`` does), calling *tick* once per entry:
    a ``probes/$pid`` tree may hold 65536 files, and the writer reports
    progress while it removes them.
    """
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    _remove_dir(dir_fd, name, tick)


def _remove_dir(dir_fd: int, name: str, tick: Callable[[], None]) -> None:
    """:func:`_remove_tree` of a name that was a directory when last listed.

    No ``lstat`` first: the open itself refuses anything but a directory
    (``O_DIRECTORY|O_NOFOLLOW``), and what it opened is what gets emptied; a
    non-directory found there instead is unlinked, never followed.  Entries
    are told apart by their ``d_type`` (no ``stat`` each): a big tree is one
    open, one listing, one unlink per file and one rmdir per directory.
    """
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)  # replaced by a non-directory meanwhile
        return
    try:
        with os.scandir(fd) as entries:
            names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for child, is_dir in names:
            if is_dir:
                _remove_dir(fd, child, tick)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(child, dir_fd=fd)
            tick()
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=dir_fd)


#: What a name-by-name removal (_remove_known, _rmdir_or_tree) fails with when the
#: directory is not as the writer made it: then _remove_tree takes it.  Any other error
#: (EIO, ENOSPC, ...) is a failure of the removal, raised.
_NOT_AS_MADE: Final = frozenset(
    (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.EPERM)
)
#: What a mapping directory holds once _unlink_by_names has emptied its parsed/.
_MAPPING_FILES: Final = ("raw", "raw-1", "dh")
#: What a pid directory holds once its generations and mappings are gone.
_PID_FILES: Final = ("next-gen", "exec-mapping")


def _rmdir_or_tree(dir_fd: int, name: str, tick: Callable[[], None] = _no_tick) -> None:
    """:func:`_remove_tree` of a directory that is most often empty by now: one rmdir.

    Anything else there (entries left, a planted non-directory) makes the rmdir fail,
    and :func:`_remove_tree` takes it: an empty directory costs one system call
    instead of a dozen (lstat, open, the listing's eight, close, rmdir).
    """
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno not in _NOT_AS_MADE:
            raise  # a failure (EIO, ...): reported, as _remove_tree's own would be
        _remove_tree(dir_fd, name, tick)


def _remove_known(
    dir_fd: int,
    name: str,
    files: tuple[str, ...],
    dirs: tuple[str, ...],
    tick: Callable[[], None] = _no_tick,
) -> None:
    """:func:`_remove_tree` of a directory the writer made, that should hold at most
    *files* and the empty directories *dirs*: those are removed by name, no listing.

    ``unlink`` never follows a symlink nor removes a directory, and ``rmdir`` only
    an empty directory; whatever else is there (a name the writer did not make, a
    planted entry, a directory still holding files) makes a step fail, and
    :func:`_remove_tree` then takes what is left.
    """
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno not in _NOT_AS_MADE:
            raise
        _remove_tree(dir_fd, name, tick)
        return
    try:
        for entry in files:
            try:  # noqa: SIM105  (contextlib.suppress costs a µs here)
                os.unlink(entry, dir_fd=fd)
            except FileNotFoundError:
                pass
        for entry in dirs:
            os.rmdir(entry, dir_fd=fd)
    except OSError as err:
        if err.errno not in _NOT_AS_MADE and err.errno != errno.ENOENT:
            raise
        if err.errno != errno.ENOENT:
            _remove_tree(dir_fd, name, tick)
            return
    finally:
        os.close(fd)
    _rmdir_or_tree(dir_fd, name, tick)


#: Where stash writers take their lock (one file per state directory), root's alone.
DEFAULT_LOCK_DIR: Final = "/run/dtprobed"
#: How long a new writer waits for the lock of an exiting predecessor before EBUSY.
LOCK_WAIT: Final = 10.0


def writer_lock(
    root_fd: int, state_dir: str, lock_dir: str, wait: float = LOCK_WAIT
) -> _WriterLock:
    """One writer per state directory, by a lock no other user can reach; returns its fd.

    The state directory is 0755, so a lock on it (or on any file in it) is one
    that every user can take: one ``flock(LOCK_SH)`` by anyone used to stop
    the writer for good.  The lock is instead ``LOCKDIR/stash-$dev-$ino.lock``
    ($dev-$ino of the state directory), in a directory that must be owned by
    us and closed to everyone else (0700, not a symlink).  It is taken
    without waiting and held for the writer's whole life: a second writer on
    the same state directory (another daemon with ``-s`` the same) refuses to
    start (after *wait* seconds) with ``EBUSY`` instead of
    interleaving with the first, whose in-memory
    quota counts would go stale.  A killed writer's lock goes with its process
    (its file stays, and is reused); a writer that closes removes the file.
    """
    st = os.fstat(root_fd)
    with contextlib.suppress(FileExistsError):
        os.mkdir(lock_dir, 0o700)
    dfd = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.fstat(dfd)
        if dst.st_uid != os.geteuid() or dst.st_mode & 0o077:
            raise StashError(
                "start",
                lock_dir,
                errno.EPERM,
                f"lock directory {lock_dir} is mode {stat.S_IMODE(dst.st_mode):04o} owned by uid "
                f"{dst.st_uid}: it must be 0700 and ours, or other users could block the writer",
            )
        name = f"stash-{st.st_dev}-{st.st_ino}.lock"
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(
                name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # a predecessor that has just lost its daemon may still be exiting
                if time.monotonic() < deadline:
                    os.close(fd)
                    time.sleep(0.05)
                    continue
                try:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                finally:
                    os.close(fd)
                raise StashError(
                    "start",
                    state_dir,
                    errno.EBUSY,
                    f"state directory {state_dir} is in use by another stash writer "
                    f"(pid {holder}; lock {lock_dir}/{name})",
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # the holder unlinks the file before it lets go: locked a file that is no
            # longer the name's, so try again with the current one
            try:
                same = (
                    os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                )
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(dfd)
        raise
    return _WriterLock(dfd, name, fd)


class _WriterLock:
    """The held writer lock; :meth:`release` unlinks the file, then lets go of it."""

    def __init__(self, dir_fd: int, name: str, fd: int) -> None:
        self._dir_fd, self._name, self._fd = dir_fd, name, fd

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self._name, dir_fd=self._dir_fd)  # still holding: no one else has it
        os.close(self._fd)
        os.close(self._dir_fd)
        self._fd = -1


def _open_in_place(dir_fd: int, name: str) -> tuple[int, int]:
    """Open a file the writer changes in place (``next-gen``) for writing, or refuse;
    the fd and the file's size.

    Never through a symlink (``O_NOFOLLOW``), never a FIFO or device (no
    blocking open, then ``S_ISREG``), and never a file with a second link: a
    hard link planted at *name* may lead outside the state directory, and
    writing through it would change that file.  ``EMLINK``/``EINVAL`` say which.
    """
    fd = os.open(name, os.O_RDWR | os.O_NONBLOCK | _OPEN_FILE, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{name} is not a regular file: not writing it")
        if st.st_nlink != 1:
            raise OSError(
                errno.EMLINK,
                f"{name} has {st.st_nlink} links (a hard link planted from elsewhere?): "
                "refusing to write through it",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def os_detail(err: OSError) -> str:
    """What went wrong, precisely: the error's own text and the name it concerns."""
    code = err.errno or errno.EIO
    text = err.strerror or os.strerror(code)
    names = [n for n in (err.filename, err.filename2) if isinstance(n, str) and n]
    if names and not any(n in text for n in names):
        text += f" ({' -> '.join(names)})"
    return f"{text} [{errno.errorcode.get(code, code)}]"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


def _stash_op(op: str) -> Callable[[_F], _F]:
    """Report any OSError of a public operation as a StashError naming the operation."""

    def wrap(func: _F) -> _F:
        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except OSError as err:
                raise StashError(
                    op, "state directory", err.errno or errno.EIO, os_detail(err)
                ) from err

        return inner  # type: ignore[return-value]

    return wrap


class _FdReserve:
    """A few fds held back so that undoing a failure still works when fds ran out.

    Removing what a failed registration created opens directories (one fd per
    level); if the failure was ``EMFILE``/``ENFILE`` those opens would fail
    too and leave the tree changed.  The reserve is released for the undo and
    taken again afterwards (best effort).
    """

    SIZE: Final = 8

    def __init__(self) -> None:
        self._fds: list[int] = []
        self.refill()

    def refill(self) -> None:
        while len(self._fds) < self.SIZE:
            try:
                self._fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


class _Undo:
    """The steps that revert a failed operation, run newest first unless committed.

    Unlike an ExitStack of callbacks, a failing undo step neither stops the
    others nor replaces the error that made the operation fail: it is logged
    (the tree then needs start-up recovery, which is said in the log line) and
    the original exception propagates with its errno.
    """

    def __init__(self, reserve: _FdReserve | None = None) -> None:
        self._steps: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        self._reserve = reserve

    def add(self, fn: Callable[..., object], *args: object) -> None:
        self._steps.append((fn, args))

    def commit(self) -> None:
        self._steps.clear()

    def __enter__(self) -> _Undo:
        return self

    def __exit__(self, *exc: object) -> None:
        steps, self._steps = self._steps, []
        if not steps:
            return
        if self._reserve is not None:
            self._reserve.release()  # the undo needs fds even if the failure was EMFILE
        try:
            self._run(steps)
        finally:
            if self._reserve is not None:
                self._reserve.refill()

    def _run(self, steps: list[tuple[Callable[..., object], tuple[object, ...]]]) -> None:
        for fn, args in reversed(steps):
            try:
                fn(*args)
            except OSError as err:
                log.error(
                    "undoing a failed stash operation: %s%r failed: %s (left for recovery)",
                    getattr(fn, "__name__", fn),
                    args,
                    os_detail(err),
                )


class _Slice:
    """The context of :meth:`Stash._sliced` (a class: a generator-based context manager
    costs a µs on every command).  A nested or interleaved command leaves ``busy``
    to the one that set it."""

    __slots__ = ("_claims", "_stash")

    def __init__(self, stash: Stash, pid: int, key: str) -> None:
        self._stash = stash
        self._claims = not stash._nested and stash.busy is None
        if self._claims:
            stash.busy, stash._since_yield = (pid, key), 0

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        if self._claims:
            self._stash.busy = None


@dataclass(frozen=True, slots=True)
class _Stored:
    """What a ``dof-pid/$pid`` says of the process that made it: its identity xattrs as
    read (None: missing or unreadable), its ``exec-mapping`` (None: missing or invalid)
    and whether an ``exec-mapping`` entry is there at all."""

    start: str | None
    token: str | None
    mapping: str | None
    has_exec_mapping: bool

    @property
    def start_time(self) -> int | None:
        return int(self.start) if self.start is not None and self.start.isdigit() else None


@dataclass
class _PidEntry:
    """What the writer remembers of one process (rebuilt from the tree at start-up).

    ``nprobes`` and ``raw`` (bytes of raw data) are per mapping key; ``uid`` is
    the uid the process is charged to (from its first registration, kept in
    the ``trusted.dtprobed.uid`` xattr).
    """

    uid: int = UNKNOWN_UID
    gens: dict[int, str] = field(default_factory=dict)
    nprobes: dict[str, int] = field(default_factory=dict)
    raw: dict[str, int] = field(default_factory=dict)

    @property
    def probes(self) -> int:
        return sum(self.nprobes.values())

    @property
    def raw_bytes(self) -> int:
        return sum(self.raw.values())


class _Usage:
    """Probes and raw bytes in the stash, in total and per uid (the quotas' counters).

    Every change of a :class:`_PidEntry`'s counts goes through :meth:`add`, so the
    three levels always agree; a uid whose counts drop to zero is forgotten.
    """

    def __init__(self) -> None:
        self.probes = 0
        self.raw = 0
        self.uid_probes: dict[int, int] = {}
        self.uid_raw: dict[int, int] = {}

    def add(self, uid: int, probes: int, raw: int) -> None:
        self.probes += probes
        self.raw += raw
        p = self.uid_probes.get(uid, 0) + probes
        r = self.uid_raw.get(uid, 0) + raw
        if p or r:
            self.uid_probes[uid], self.uid_raw[uid] = p, r
        else:
            self.uid_probes.pop(uid, None)
            self.uid_raw.pop(uid, None)

    def drop(self, entry: _PidEntry) -> None:
        self.add(entry.uid, -entry.probes, -entry.raw_bytes)


class Progress:
    """Calls *report(done, what)* at most every *interval* seconds while work advances.

    The writer's operations call :meth:`tick` once per unit of work (a probe
    file written or removed, a process recovered or indexed); :meth:`begin`
    starts a command.  With no *report* it only counts.

    A few steps have no loop of ours to tick in but are bounded by their input
    (the grammar check of a command's records, waiting for a predecessor's lock,
    at most ``LOCK_WAIT``): they run inside :meth:`bounded`, during which a
    helper thread reports instead.  Nothing unbounded may run inside it, or a
    stuck writer would look alive.  *report* must be thread-safe.
    """

    def __init__(
        self, report: Callable[[int, str], None] | None = None, interval: float = 0.25
    ) -> None:
        self.report = report
        self.interval = interval
        self.done = 0
        self.what = ""
        self._next = time.monotonic() + interval
        self._phase = threading.Event()
        self._phase_lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def bounded(self, what: str) -> Iterator[None]:
        """Report progress from a helper thread while the block runs (see the class doc)."""
        if self.report is None:
            yield
            return
        with self._phase_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="stash-progress", daemon=True
                )
                self._thread.start()
        self.what = what
        self._phase.set()
        try:
            yield
        finally:
            # under the lock the helper reports with: no Progress frame of this phase
            # can follow what the main thread writes next (e.g. the reply)
            with self._report_lock:
                self._phase.clear()

    def _run(self) -> None:
        report = self.report
        assert report is not None
        while True:
            self._phase.wait()
            time.sleep(self.interval)
            with self._report_lock:
                if self._phase.is_set():
                    with contextlib.suppress(OSError):
                        report(self.done, self.what)

    def begin(self, what: str) -> None:
        self.done = 0
        self.what = what
        self._next = time.monotonic() + self.interval

    def tick(self) -> None:
        self.done += 1
        if self.report is None:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            self.report(self.done, self.what)


class Stash:
    """The on-disk operations; one instance per writer process.

    Every public method takes the exclusive lock, validates its input before
    the first change, and either completes or undoes exactly what it created.
    """

    def __init__(
        self,
        state_dir: str,
        quotas: StashQuotas | None = None,
        *,
        recover: bool = True,
        lock_dir: str = DEFAULT_LOCK_DIR,
        lock_wait: float = LOCK_WAIT,
        progress: Progress | None = None,
    ) -> None:
        self.quotas = quotas if quotas is not None else StashQuotas()
        self.progress = progress if progress is not None else Progress()
        self._tick = self.progress.tick
        #: Called every YIELD_EVERY units of a long Register or RemovePid: the writer
        #: runs a waiting priority command there (run_interleaved), if it may.
        self.interleave: Callable[[], None] | None = None
        #: (pid, mapping key or "") of the Register or RemovePid in progress that
        #: other processes' small commands may be interleaved with; None otherwise.
        self.busy: tuple[int, str] | None = None
        self._nested = False
        self._since_yield = 0
        # the top-level RemovePid in progress may stop for a registration (request_deferral)
        self._deferrable = False
        self._defer_requested = False
        self._fix_modes = (_current_umask() & DIR_MODE) != 0
        self._fds = contextlib.ExitStack()
        self._index: dict[int, _PidEntry] = {}
        self.usage = _Usage()
        self._reserve = _FdReserve()
        self._fds.callback(self._reserve.release)
        try:
            os.makedirs(state_dir, DIR_MODE, exist_ok=True)
            # the one absolute path: everything else is relative to these fds
            self.root = self._fds.enter_context(DirFd(None, state_dir, readable=True))
            with self.progress.bounded("waiting for the writer lock"):  # ≤ lock_wait
                lock = writer_lock(self.root.fd, state_dir, lock_dir, lock_wait)
            self._fds.callback(lock.release)
            stash = self._fds.enter_context(self._mkdir_open(self.root.fd, "stash"))
            self.dof = self._fds.enter_context(self._mkdir_open(stash.fd, "dof", readable=True))
            self.dofpid = self._fds.enter_context(
                self._mkdir_open(stash.fd, "dof-pid", readable=True)
            )
            self.probes = self._fds.enter_context(
                self._mkdir_open(self.root.fd, "probes", readable=True)
            )
            if recover:
                self.progress.begin("recovery")
                self._recover()
            self.progress.begin("index")
            self._rebuild_index()
        except BaseException:
            self._fds.close()
            raise

    def close(self) -> None:
        self._fds.close()

    @property
    def process_count(self) -> int:
        """Processes in the index (those with a ``dof-pid/$pid`` directory)."""
        return len(self._index)

    # ------------------------------------------------------------ interleaving

    def _sliced(self, pid: int, key: str) -> _Slice:
        """While the block runs, it yields to priority commands of other processes.

        What interleaves never touches *pid* (nor mapping *key*): the writer
        checks that before it runs one (dtprobed.stash.writer).  The block's
        own state (its undo steps, open directories, reserved quota) stays as
        it is; its all-or-nothing commit is unchanged: the generation symlink
        is written last, after every file, as without interleaving.
        """
        return _Slice(self, pid, key)

    def _tick_yield(self) -> None:
        self._tick()
        if self.busy is None or self.interleave is None:
            return
        self._since_yield += 1
        if self._since_yield >= YIELD_EVERY:
            self._since_yield = 0
            self.interleave()
            if self._defer_requested:
                raise RemovalDeferred(f"PID {self.busy[0]}: a registration waits for the writer")

    def request_deferral(self) -> None:
        """A registration waits: the deferrable removal in progress (if any) stops at
        the end of this yield point (:class:`RemovalDeferred`); anything else goes on."""
        if self._deferrable:
            self._defer_requested = True

    def run_interleaved(self, fn: Callable[[], _T]) -> _T:
        """Run one priority command inside the yielding one (no deeper nesting)."""
        busy, self.busy, self._nested = self.busy, None, True
        try:
            return fn()
        finally:
            self.busy, self._nested = busy, False

    def probes_of(self, pid: int) -> int:
        """Probes stored for *pid* (0 if none): what removing it costs."""
        entry = self._index.get(pid)
        return entry.probes if entry is not None else 0

    # ------------------------------------------------------------ small pieces

    def _mkdir_open(self, parent: int, name: str, *, readable: bool = False) -> DirFd:
        try:
            os.mkdir(name, DIR_MODE, dir_fd=parent)
        except FileExistsError:
            return DirFd(parent, name, readable=readable)
        if self._fix_modes:
            os.chmod(name, DIR_MODE, dir_fd=parent, follow_symlinks=False)
        return DirFd(parent, name, readable=readable)

    def _mkdir_new(self, parent: int, name: str) -> None:
        os.mkdir(name, DIR_MODE, dir_fd=parent)
        if self._fix_modes:
            os.chmod(name, DIR_MODE, dir_fd=parent, follow_symlinks=False)

    def _tmpfile(self, dir_fd: int, data: bytes) -> int:
        """An anonymous complete file in *dir_fd*; the caller links it and closes it."""
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, FILE_MODE, dir_fd=dir_fd)
        try:
            write_all(fd, data)
            if self._fix_modes:
                os.fchmod(fd, FILE_MODE)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _link_fd(fd: int, dir_fd: int, name: str) -> None:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)

    def _write_new(self, dir_fd: int, name: str, data: bytes) -> None:
        """Create *name* and write it in place (``O_CREAT|O_EXCL``; ``EEXIST`` if taken).

        Only in a directory this command created and nothing names yet (a new
        ``dof-pid/$pid`` before its first generation, a mapping directory before
        the generation symlink): no reader sees the file before it is complete,
        and the directory's undo, or start-up recovery after a crash, removes it
        whole.  Three system calls instead of :meth:`_write_file`'s four and its
        ``/proc/self/fd`` path walk.
        """
        fd = os.open(name, _CREATE_NEW, FILE_MODE, dir_fd=dir_fd)
        try:
            written = os.write(fd, data)  # all of it, on tmpfs: write_all's view only if not
            if written != len(data):
                write_all(fd, memoryview(data)[written:])
            if self._fix_modes:
                os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)

    def _write_file(self, dir_fd: int, name: str, data: bytes) -> None:
        """Create *name* complete in one step; ``EEXIST`` if the name is taken."""
        fd = self._tmpfile(dir_fd, data)
        try:
            self._link_fd(fd, dir_fd, name)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ index

    def _rebuild_index(self) -> None:
        self._index.clear()
        self.usage = _Usage()
        for pid in self._pids():
            entry = self._index[pid] = self._scan_pid(pid)
            self.usage.add(entry.uid, entry.probes, entry.raw_bytes)
            self._tick()
        if self.usage.probes or self._index:
            log.info(
                "stash index: %d processes, %d probes, %d raw bytes, %d uids",
                len(self._index),
                self.usage.probes,
                self.usage.raw,
                len(self.usage.uid_probes),
            )

    def _pids(self) -> list[int]:
        out = []
        for entry in os.scandir(self.dofpid.fd):
            if is_number(entry.name) and entry.is_dir(follow_symlinks=False):
                out.append(int(entry.name))
        return sorted(out)

    def _scan_pid(self, pid: int) -> _PidEntry:
        entry = _PidEntry()
        with DirFd(self.dofpid.fd, str(pid), readable=True) as pdir:
            uid = self._getxattr(pdir.fd, XATTR_UID)
            if uid is not None and uid.isdigit() and int(uid) <= UNKNOWN_UID:
                entry.uid = int(uid)
            for item in os.scandir(pdir.fd):
                if is_number(item.name) and item.is_symlink():
                    target = os.readlink(item.name, dir_fd=pdir.fd)
                    if split_key(target) is not None:
                        entry.gens[int(item.name)] = target
            for key in set(entry.gens.values()):
                try:
                    with DirFd(pdir.fd, key) as mdir, DirFd(mdir.fd, "parsed", readable=True) as pd:
                        names = os.listdir(pd.fd)
                except OSError:
                    names = []
                entry.nprobes[key] = sum(1 for n in names if n != "version")
                entry.raw[key] = self._raw_size(pdir.fd, key)
        return entry

    @staticmethod
    def _raw_size(pid_fd: int, key: str) -> int:
        """Bytes of raw data a stored mapping is charged (its raw files less their base)."""
        total = 0
        for index in range(MAX_RAW_BLOCKS):
            try:
                st = os.stat(f"{key}/{raw_name(index)}", dir_fd=pid_fd, follow_symlinks=False)
            except OSError:
                continue
            # an older daemon's raw file has no base prefix: it is charged 8 bytes less
            total += max(0, st.st_size - _BASE.size)
        return total

    # ------------------------------------------------------------ validation

    def check_records(
        self, records: Sequence[ResultRecord], op: str, *, notes: bool = False
    ) -> list[ParsedProbe]:
        """The whole record stream, before any write: grammar, names, counts.

        *notes*: the stream of a ``.note.usdt`` object, whose tracepoints come
        in upstream's order (unique, not sorted).
        """
        try:
            if len(records) <= CHECK_YIELD_EVERY:
                # checked in well under a millisecond: no Progress frame or look at the
                # priority channel could come due (the next yield point is the first
                # probe files'), and the progress helper's hand-over costs 3 µs
                checker = check_stream(
                    records if isinstance(records, list) else list(records),
                    max_probes=None,
                    max_tracepoints=None,
                    notes=notes,
                )
            else:
                checker = self._check_large(records, notes)
        except ProtocolError as err:
            raise StashError(op, "records", errno.EINVAL, f"bad record stream: {err}") from err
        if checker.error is not None:
            raise StashError(
                op, "records", errno.EINVAL, f"record stream is a parser error: {checker.error}"
            )
        return checker.probes

    def _check_large(self, records: Sequence[ResultRecord], notes: bool) -> StreamChecker:
        """check_records of a stream long enough to report progress and yield while checked."""
        with self.progress.bounded("checking records"):  # linear in the frame
            if self.busy is not None and self.interleave is not None:
                return self._check_yielding(records, notes)
            return check_stream(
                list(records),
                # the frame bound limits the stream; the quotas are checked next (EDQUOT)
                max_probes=None,
                max_tracepoints=None,
                notes=notes,
            )

    def _check_yielding(self, records: Sequence[ResultRecord], notes: bool) -> StreamChecker:
        """check_stream, with a look at the priority channel every CHECK_YIELD_EVERY records
        (60000 records of a 20000-probe DOF take ~50 ms to check)."""
        checker = StreamChecker(max_probes=None, max_tracepoints=None, notes=notes)
        interleave = self.interleave
        assert interleave is not None
        for start in range(0, len(records), CHECK_YIELD_EVERY):
            checker.feed_all(records, start, start + CHECK_YIELD_EVERY)
            interleave()
        if not checker.done:
            raise ProtocolError(f"stream ended early, expected {checker.expected}")
        return checker

    def _check_registration(self, reg: Registration) -> None:
        if len(reg.helper) != HELPER_SIZE:
            raise StashError("add", "dh", errno.EINVAL, f"helper is {len(reg.helper)} bytes")
        if not reg.notes and reg.raw[0].base != 0:
            raise StashError("add", "raw", errno.EINVAL, f"DOF block with base {reg.raw[0].base}")
        if reg.notes and reg.dev == 0:
            raise StashError("add", "raw", errno.EINVAL, "notes of anonymous memory")

    def _quota_error(self, what: str, value: int, limit: int) -> StashError:
        return StashError(
            "add", what, errno.EDQUOT, f"quota exceeded: {what} would be {value}, limit {limit}"
        )

    # ------------------------------------------------------------ identity

    def _stored_identity(self, pid: int) -> tuple[int | None, str | None, str | None] | None:
        """(start_time, exec_token, exec-mapping) of dof-pid/$pid, or None if absent."""
        try:
            pdir = DirFd(self.dofpid.fd, str(pid), readable=True)
        except FileNotFoundError:
            return None
        with pdir:
            stored = self._read_stored(pdir.fd)
        return stored.start_time, stored.token, stored.mapping

    def _read_stored(self, pid_fd: int) -> _Stored:
        start = self._getxattr(pid_fd, XATTR_START_TIME)
        token = self._getxattr(pid_fd, XATTR_EXEC_TOKEN)
        try:
            mapping = parse_exec_mapping(read_small(pid_fd, "exec-mapping", MAX_EXEC_MAPPING))
            present = True
        except FileNotFoundError:
            mapping, present = None, False
        except OSError:  # there, but not a file we can read (verify reports it)
            mapping, present = None, True
        return _Stored(start, token, mapping, present)

    @staticmethod
    def _getxattr(fd: int, name: str) -> str | None:
        try:
            return os.getxattr(fd, name).decode("ascii", "replace")
        except OSError:
            return None

    def _is_other_process(self, reg: Registration) -> str | None:
        """Why the stored dof-pid/$pid belongs to an earlier process or image (None: same)."""
        try:
            pdir = DirFd(self.dofpid.fd, str(reg.pid), readable=True)
        except FileNotFoundError:
            return None
        with pdir:
            return self._other_than(reg, self._read_stored(pdir.fd))

    @staticmethod
    def _other_than(reg: Registration, stored: _Stored) -> str | None:
        """Why *stored* is an earlier process's or image's than *reg*'s (None: the same)."""
        start = stored.start_time
        if start is not None and start != reg.start_time:
            return "pid reused (start time changed)"
        if stored.mapping is not None and stored.mapping != mapping_key(reg.exec_dev, reg.exec_ino):
            return "exec() detected (executable changed)"
        if stored.token is not None and reg.exec_token and stored.token != reg.exec_token:
            return "exec() detected (exec token changed)"
        return None

    # ------------------------------------------------------------ register

    @_stash_op("add")
    def register(self, reg: Registration, records: Sequence[ResultRecord]) -> int:
        """add + write-parsed as one all-or-nothing operation; returns the generation."""
        self._check_registration(reg)
        key = mapping_key(reg.dev, reg.ino)
        with self._sliced(reg.pid, key):
            probes = self.check_records(records, "add", notes=reg.notes)
            return self._register(reg, key, probes)

    @_stash_op("add")
    def register_probes(self, reg: Registration, probes: list[ParsedProbe]) -> int:
        """As :meth:`register`, for probes already grouped (and checked) by the caller."""
        self._check_registration(reg)
        key = mapping_key(reg.dev, reg.ino)
        with self._sliced(reg.pid, key):
            return self._register(reg, key, probes)

    def _register(self, reg: Registration, key: str, probes: list[ParsedProbe]) -> int:
        """The registration of mapping *key* (``mapping_key(reg.dev, reg.ino)``)."""
        existing = self._index.get(reg.pid)
        if existing is None:
            # A pid the index does not know is most often a new process with no directory:
            # its identity is checked only if one is found (_open_pid_dir), which saves a
            # lookup.  Nothing depends on the check then: no entry is replaced, no quota
            # given back.
            return self._register_in(reg, key, probes, None, None, None)
        try:
            held = DirFd(self.dofpid.fd, str(reg.pid), readable=True)
        except FileNotFoundError:
            return self._register_in(reg, key, probes, existing, None, None)
        # the directory the identity is read from is the one registered into (unless it
        # is an earlier process's): one open, and what it said is not asked again
        with held:
            return self._register_in(reg, key, probes, existing, held, self._read_stored(held.fd))

    def _register_in(
        self,
        reg: Registration,
        key: str,
        probes: list[ParsedProbe],
        existing: _PidEntry | None,
        held: DirFd | None,
        stored: _Stored | None,
    ) -> int:
        """_register, with the index's entry for the pid and, if it has a directory, that
        directory (*held*, the caller closes it) and what it says (*stored*)."""
        pid, nprobes, raw_bytes = reg.pid, len(probes), reg.raw_bytes
        stale = self._other_than(reg, stored) if stored is not None else None
        if reg.caught_up and not stale and existing is not None and key in existing.nprobes:
            # catch-up raced with the process's own registration: keep that one
            return min(g for g, k in existing.gens.items() if k == key)
        entry = _PidEntry(uid=reg.uid) if stale or existing is None else existing
        # quotas, against the state after a pending exec/reuse prune, before any change
        new = key not in entry.nprobes
        self._check_quotas(
            entry,
            existing if stale else None,
            nprobes if new else 0,
            raw_bytes if new else 0,
        )
        reserved = False
        try:
            if stale:
                # A separate, committed step (docs/stash.md): these entries belong to a
                # process or image that no longer exists, whatever becomes of this request.
                log.info("%i: %s, removing old DOF", pid, stale)
                self._remove_pid(pid)
            if new:
                # counted from here: a priority command interleaved with this one checks
                # its quotas against the stash as it will be (given back on failure)
                self.usage.add(entry.uid, nprobes, raw_bytes)
                reserved = True
            with _Undo(self._reserve) as undo:  # unwound last: removes dof-pid/$pid if created here
                if held is not None and not stale:
                    pdir, created = held, False
                else:
                    pdir, created = self._open_pid_dir(reg, undo, checked=existing is not None)
                    stored = None
                # inner's steps use pdir's fd: they run before it is closed
                with pdir, _Undo(self._reserve) as inner:
                    if created:
                        self._init_pid_dir(pdir, reg)
                    else:
                        self._complete_pid_dir(pdir, reg, inner, stored)
                    if key not in entry.nprobes:
                        self._add_mapping(pdir, reg, key, probes, inner)
                    if created:
                        gen = self._first_generation(pdir, key, 1 if reg.caught_up else 0)
                    else:
                        gen = self._add_generation(pdir, key, inner)
                    if reg.caught_up:
                        self._mark_caught_up(pdir.fd, gen, inner)
                    inner.commit()
                    # a directory made here has no caught-up generations to replace
                    replaced = (
                        [] if reg.caught_up or created else self._drop_caught_up(pdir.fd, key, gen)
                    )
                undo.commit()
        except BaseException as err:
            if reserved:
                self.usage.add(entry.uid, -nprobes, -raw_bytes)
            if isinstance(err, OSError):
                raise StashError(
                    "add", f"PID {pid} mapping {key}", err.errno or errno.EIO, os_detail(err)
                ) from err
            raise
        # entry is the index's, or a new one for a new (or replaced) process's directory
        entry = self._index.setdefault(pid, entry)
        entry.gens[gen] = key
        for old in replaced:
            entry.gens.pop(old, None)
        if key not in entry.nprobes:  # its usage was reserved above
            entry.nprobes[key] = nprobes
            entry.raw[key] = raw_bytes
        return gen

    def _check_quotas(
        self, entry: _PidEntry, replaced: _PidEntry | None, new_probes: int, new_raw: int
    ) -> None:
        """EDQUOT if adding *new_probes* and *new_raw* bytes to *entry* breaks a quota.

        *replaced*: the entry of an earlier process or image with this pid that the
        registration prunes first (its counts are given back).
        """
        q, usage, uid = self.quotas, self.usage, entry.uid
        same_uid = replaced is not None and replaced.uid == uid
        # only what this request adds can break a quota (a lowered limit does not stop a
        # process re-registering what it has); checked in this order, the first broken
        # one reported, and each message built only then
        if len(entry.gens) + 1 > q.max_generations:
            raise self._quota_error(
                "generations of this process", len(entry.gens) + 1, q.max_generations
            )
        if new_probes:
            self._check_growth(
                "probes",
                uid,
                new_probes,
                entry.probes,
                usage.uid_probes,
                usage.probes,
                (replaced.probes if replaced is not None else 0, same_uid),
                (q.max_probes_per_pid, q.max_probes_per_uid, q.max_probes_total),
            )
        if new_raw:
            self._check_growth(
                "raw bytes",
                uid,
                new_raw,
                entry.raw_bytes,
                usage.uid_raw,
                usage.raw,
                (replaced.raw_bytes if replaced is not None else 0, same_uid),
                (q.max_raw_bytes_per_pid, q.max_raw_bytes_per_uid, q.max_raw_bytes_total),
            )

    def _check_growth(
        self,
        what: str,
        uid: int,
        new: int,
        of_pid: int,
        by_uid: dict[int, int],
        in_all: int,
        given_back: tuple[int, bool],
        limits: tuple[int, int, int],
    ) -> None:
        """EDQUOT if *new* more of *what* breaks its per-process, per-uid or total quota.

        *given_back*: what a replaced entry of the pid returns, and whether it was this
        uid's.  Each message is built only for the quota it reports.
        """
        back, same_uid = given_back
        per_pid, per_uid, total = limits
        for where, value, limit in (
            ("of this process", of_pid + new, per_pid),
            (None, by_uid.get(uid, 0) - (back if same_uid else 0) + new, per_uid),
            ("in the stash", in_all - back + new, total),
        ):
            if value > limit:
                raise self._quota_error(f"{what} {where or f'of uid {uid}'}", value, limit)

    def _open_pid_dir(self, reg: Registration, undo: _Undo, *, checked: bool) -> tuple[DirFd, bool]:
        """dof-pid/$pid, created if missing (then *undo* removes it whole); True if created.

        *checked*: the caller compared the stored identity already (the pid is in the
        index).  Otherwise a directory found here was left by a removal cut short
        (deferred, or failed) or an undo that failed, and is checked now: if it is an
        earlier process's or image's, it goes (a committed step, as in _register) and a
        new one is made.
        """
        name = str(reg.pid)
        parent = self.dofpid.fd
        try:
            self._mkdir_new(parent, name)
        except FileExistsError:
            stale = None if checked else self._is_other_process(reg)
            if not stale:
                return DirFd(parent, name, readable=True), False
            log.info("%i: %s, removing old DOF", reg.pid, stale)
            self._remove_pid(reg.pid)
            self._mkdir_new(parent, name)
        undo.add(_remove_tree, parent, name)  # created here: goes entirely
        return DirFd(parent, name, readable=True), True

    def _init_pid_dir(self, pdir: DirFd, reg: Registration) -> None:
        """A directory this request created: what goes in first (its undo removes it whole).

        ``next-gen`` comes with the first generation (_first_generation).
        """
        os.setxattr(pdir.fd, XATTR_START_TIME, str(reg.start_time).encode())
        os.setxattr(pdir.fd, XATTR_EXEC_TOKEN, reg.exec_token.encode())
        os.setxattr(pdir.fd, XATTR_UID, str(reg.uid).encode())
        self._write_new(pdir.fd, "exec-mapping", exec_mapping_bytes(reg.exec_dev, reg.exec_ino))

    def _complete_pid_dir(
        self, pdir: DirFd, reg: Registration, undo: _Undo, stored: _Stored | None
    ) -> None:
        """An existing dir of this same process: add what an upstream daemon did not write.

        *stored*: what the directory said when the identity was checked (None: read it).
        """
        if stored is None:
            stored = self._read_stored(pdir.fd)
        for name, have, value in (
            (XATTR_START_TIME, stored.start, str(reg.start_time)),
            (XATTR_EXEC_TOKEN, stored.token, reg.exec_token),
            (XATTR_UID, self._getxattr(pdir.fd, XATTR_UID), str(reg.uid)),
        ):
            if have is None:
                os.setxattr(pdir.fd, name, value.encode())
                undo.add(os.removexattr, pdir.fd, name)
        if not stored.has_exec_mapping:
            self._write_file(
                pdir.fd, "exec-mapping", exec_mapping_bytes(reg.exec_dev, reg.exec_ino)
            )
            undo.add(_unlink_quiet, pdir.fd, "exec-mapping")

    def _add_mapping(
        self,
        pdir: DirFd,
        reg: Registration,
        key: str,
        probes: list[ParsedProbe],
        undo: _Undo,
    ) -> None:
        self._mkdir_new(pdir.fd, key)
        undo.add(_remove_tree, pdir.fd, key)  # raw, dh, parsed/ go with it
        with DirFd(pdir.fd, key) as mdir:
            self._write_raw(mdir, reg, key, undo)
            self._write_new(mdir.fd, "dh", reg.helper)
            self._mkdir_new(mdir.fd, "parsed")
            with DirFd(mdir.fd, "parsed") as parsed:
                self._write_parsed(reg.pid, parsed, probes, undo, undo_files=False)

    def _write_raw(self, mdir: DirFd, reg: Registration, key: str, undo: _Undo) -> None:
        for index, block in enumerate(reg.raw):
            self._write_block(mdir, index, _BASE.pack(block.base) + block.data, reg, key, undo)

    def _write_block(
        self, mdir: DirFd, index: int, data: bytes, reg: Registration, key: str, undo: _Undo
    ) -> None:
        own, shared = raw_name(index), shared_raw_name(key, index)
        if reg.dev == 0:  # anonymous memory: per process, never shared
            self._write_new(mdir.fd, own, data)  # mdir is the new mapping's
            return
        try:
            st = os.lstat(shared, dir_fd=self.dof.fd)
        except FileNotFoundError:
            # written complete in the new mapping directory (which nothing names yet),
            # then given its shared name: stash/dof never shows a partial file, and no
            # O_TMPFILE + /proc/self/fd link is needed (one syscall and a path walk fewer)
            self._write_new(mdir.fd, own, data)
            os.link(own, shared, src_dir_fd=mdir.fd, dst_dir_fd=self.dof.fd, follow_symlinks=False)
            undo.add(_unlink_quiet, self.dof.fd, shared)
            return
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"stash/dof/{shared} is not a regular file")
        if st.st_size == len(data) and read_small(self.dof.fd, shared, len(data)) == data:
            os.link(shared, own, src_dir_fd=self.dof.fd, dst_dir_fd=mdir.fd, follow_symlinks=False)
        else:
            # different bytes (ASLR relocations, or a hostile process): keep our own copy
            self._write_new(mdir.fd, own, data)

    def _write_parsed(
        self,
        pid: int,
        parsed: DirFd,
        probes: list[ParsedProbe],
        undo: _Undo,
        *,
        undo_files: bool,
    ) -> None:
        """One file per probe plus its probes/ link, then ``version`` last.

        The undo callback removes the probes/ links and directories this call
        created and, with *undo_files* (the caller keeps *parsed* open until
        its undo stack has run), the parsed files; nothing else.  It reopens
        the probes/ directories by name (O_NOFOLLOW), since it may run after
        this call's directory fds are closed.

        Without *undo_files* the caller has just created *parsed* in a mapping
        directory that no generation names yet and that its undo removes
        whole: no reader can reach a file in it before the generation symlink
        (the commit point, written after ``version``), and recovery rolls back
        such a mapping.  Its files are then created by name and written in
        place (``O_CREAT|O_EXCL``: open, write, close, link — four syscalls a
        probe) instead of as anonymous ``O_TMPFILE`` files linked in through
        ``/proc/self/fd`` (five, and the costliest path walk).  A probes/
        entry is linked only once its file is complete and closed, in both
        cases.
        """
        spid = str(pid)
        created_files: list[str] = []
        created_links: list[tuple[str, ...]] = []
        created_dirs: list[tuple[str, ...]] = []
        # probes/<pid>/<prv pid>/<mod> currently open, outermost first.  Only
        # one chain is held: a DOF may name 10^5 functions, one fd each would
        # exhaust RLIMIT_NOFILE.  Probes of one function are adjacent, so
        # reopening on a change of path is rare.
        chain: list[tuple[str, DirFd]] = []
        provider_records: dict[Provider, bytes] = {}
        # the <fun> directory of the current probe: the fd its entries are linked
        # relative to, and the prefix of their names there (see fun_target)
        fun_path: tuple[str, ...] = ()
        fun_open: DirFd | None = None
        link_dir, link_prefix = -1, ""
        mod_path: tuple[str, ...] = ()  # the path *chain* holds

        def unwind() -> None:
            for path in reversed(created_links):
                with contextlib.suppress(OSError), self._open_probes_dir(path[:-1]) as d:
                    os.unlink(path[-1], dir_fd=d.fd)
            if undo_files:
                for name in reversed(created_files):
                    _unlink_quiet(parsed.fd, name)
            for path in reversed(created_dirs):
                self._rmdir_probes(path)

        def subdir(path: tuple[str, ...]) -> DirFd:
            common = 0
            while common < min(len(chain), len(path)) and chain[common][0] == path[common]:
                common += 1
            for _, stale in reversed(chain[common:]):
                stale.close()
            del chain[common:]
            for depth in range(common, len(path)):
                parent = self.probes if depth == 0 else chain[depth - 1][1]
                try:
                    self._mkdir_new(parent.fd, path[depth])
                    created_dirs.append(path[: depth + 1])
                except FileExistsError:
                    pass
                chain.append((path[depth], DirFd(parent.fd, path[depth])))
            return chain[-1][1]

        def fun_target(path: tuple[str, ...]) -> tuple[int, str]:
            """(dir fd, name prefix) for entries of probes/<path…>.

            A <fun> directory this call creates is reached as ``fun/prb`` from
            its parent's fd: it is a plain directory that only this process
            writes in, made a moment ago, and a DOF often has one function per
            probe (an open and a close saved each).  One that already existed
            is opened ``O_NOFOLLOW`` as every other directory is.
            """
            nonlocal fun_open, mod_path
            # probes of one module are adjacent: its directory is usually the chain's end
            if path[:-1] != mod_path:
                subdir(path[:-1])
                mod_path = path[:-1]
            mod_dir = chain[-1][1]
            if fun_open is not None:
                fun_open.close()
                fun_open = None
            try:
                self._mkdir_new(mod_dir.fd, path[-1])
            except FileExistsError:
                fun_open = DirFd(mod_dir.fd, path[-1])
                return fun_open.fd, ""
            created_dirs.append(path)
            return mod_dir.fd, path[-1] + "/"

        in_place = not undo_files
        parsed_fd = parsed.fd
        fix_modes = self._fix_modes
        undo.add(unwind)
        # the provider of the previous probe and its record: probes of one provider are
        # adjacent, so the dict (which hashes the record's fields) is rarely asked
        last_provider: Provider | None = None
        provider_record = b""
        try:
            for provider, record, args, tracepoints in probes:
                prv, mod, fun, prb = provider.name, record.mod, record.fun, record.prb
                if provider is not last_provider:
                    last_provider = provider
                    provider_record = provider_records.get(provider) or provider_records.setdefault(
                        provider, encode_record(provider)
                    )
                    prv_dir = f"{prv}{spid}"
                dir_path = (spid, prv_dir, mod, fun)
                if dir_path != fun_path:
                    link_dir, link_prefix = fun_target(dir_path)
                    fun_path = dir_path
                data = encode_probe_file(
                    provider, record, args, tracepoints, provider_record=provider_record
                )
                spec = probespec(prv, mod, fun, prb)
                if in_place:
                    # _write_new, inline: a call is a tenth of this loop's Python
                    fd = os.open(spec, _CREATE_NEW, FILE_MODE, dir_fd=parsed_fd)
                    try:
                        written = os.write(fd, data)
                        if written != len(data):
                            write_all(fd, memoryview(data)[written:])
                        if fix_modes:
                            os.fchmod(fd, FILE_MODE)
                    finally:
                        os.close(fd)
                    created_files.append(spec)
                else:
                    fd = self._tmpfile(parsed_fd, data)
                    try:
                        self._link_fd(fd, parsed_fd, spec)
                    finally:
                        os.close(fd)
                    created_files.append(spec)
                try:
                    os.link(
                        spec,
                        link_prefix + prb,
                        src_dir_fd=parsed_fd,
                        dst_dir_fd=link_dir,
                        follow_symlinks=False,
                    )
                    created_links.append((*dir_path, prb))
                except FileExistsError:
                    # another mapping of this process has the same probe: it stays bound there
                    st = os.lstat(link_prefix + prb, dir_fd=link_dir)
                    if not stat.S_ISREG(st.st_mode):
                        raise OSError(
                            errno.EINVAL, f"probes entry {printable(prb)} is not a file"
                        ) from None
                self._tick_yield()
            if in_place:
                self._write_new(parsed_fd, "version", VERSION_BYTES)
            else:
                self._write_file(parsed_fd, "version", VERSION_BYTES)
            created_files.append("version")
        finally:
            if fun_open is not None:
                fun_open.close()
            for _, d in reversed(chain):
                d.close()

    def _rmdir_probes(self, path: tuple[str, ...]) -> bool:
        """rmdir probes/<path…> if empty; False if it is not (or cannot be) removed."""
        try:
            if len(path) == 1:
                os.rmdir(path[0], dir_fd=self.probes.fd)
            else:
                with self._open_probes_dir(path[:-1]) as d:
                    os.rmdir(path[-1], dir_fd=d.fd)
        except OSError:
            return False
        return True

    def _open_probes_dir(self, path: tuple[str, ...]) -> DirFd:
        """probes/<path…>, each component opened O_NOFOLLOW|O_DIRECTORY."""
        current = DirFd(self.probes.fd, path[0])
        try:
            for comp in path[1:]:
                nxt = DirFd(current.fd, comp)
                current.close()
                current = nxt
        except BaseException:
            current.close()
            raise
        return current

    def _first_generation(self, pdir: DirFd, key: str, gen: int) -> int:
        """Generation *gen* of a directory this request created: ``next-gen``, then the symlink.

        ``next-gen`` is made with its final size (*gen* + 1) before the commit point:
        the directory has no generation yet, so no reader takes it as registered,
        and the undo (or recovery, after a crash) removes it whole, ``next-gen``
        with it.  Four system calls where making it empty and raising it after the
        symlink (_add_generation) took eight.  *gen* is 1 for catch-up, whose process
        may hold generation 0 from its failed ioctl.
        """
        fd = os.open("next-gen", _CREATE_NEW, FILE_MODE, dir_fd=pdir.fd)
        try:
            os.ftruncate(fd, gen + 1)  # sparse, as upstream's
            if self._fix_modes:
                os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)
        os.symlink(key, str(gen), dir_fd=pdir.fd)  # the commit point
        return gen

    def _add_generation(self, pdir: DirFd, key: str, undo: _Undo) -> int:
        fd, gen = _open_in_place(pdir.fd, "next-gen")
        try:
            if gen >= (1 << 31) - 1:
                raise OSError(errno.EOVERFLOW, "generation numbers exhausted")
            # The commit point first: a crash before it leaves next-gen as it was
            # (nothing of the registration stays); a crash between the two leaves
            # next-gen behind the symlink, which start-up recovery raises.
            os.symlink(key, str(gen), dir_fd=pdir.fd)
            try:
                os.ftruncate(fd, gen + 1)
            except BaseException:
                _unlink_quiet(pdir.fd, str(gen))  # un-commit
                raise
        finally:
            os.close(fd)
        return gen

    def _mark_caught_up(self, pid_fd: int, gen: int, undo: _Undo) -> None:
        """List *gen* in the process's caught-up xattr (after its symlink: never ahead)."""
        old = self._getxattr(pid_fd, XATTR_CAUGHT_UP)
        value = f"{old} {gen}" if old else str(gen)
        if len(value) > MAX_CAUGHT_UP_XATTR:
            raise OSError(errno.EDQUOT, f"more than {MAX_CAUGHT_UP_XATTR} bytes of caught-up gens")
        os.setxattr(pid_fd, XATTR_CAUGHT_UP, value.encode())
        if old:
            undo.add(os.setxattr, pid_fd, XATTR_CAUGHT_UP, old.encode())
        else:
            undo.add(os.removexattr, pid_fd, XATTR_CAUGHT_UP)

    def _drop_caught_up(self, pid_fd: int, key: str, gen: int) -> list[int]:
        """A live registration of *key* replaces its caught-up generations; those removed.

        Runs after the new generation's commit: it names the same mapping
        directory, which stays.  A crash in between leaves two generations of
        one mapping, which is valid.
        """
        raw = self._getxattr(pid_fd, XATTR_CAUGHT_UP)
        if not raw:
            return []
        dropped = []
        for old in sorted(parse_caught_up(raw.encode())):
            if old == gen:
                continue
            try:
                if os.readlink(str(old), dir_fd=pid_fd) != key:
                    continue
                os.unlink(str(old), dir_fd=pid_fd)
            except OSError:
                continue  # gone already (removed, or never there)
            dropped.append(old)
        return dropped

    # ------------------------------------------------------------ removal

    @_stash_op("remove")
    def remove(self, pid: int, gen: int) -> bool:
        """DTRACEHIOC_REMOVE; an unknown pid or generation is success (upstream).

        True when generation *gen* of *pid* existed (and is gone now).
        """
        with self._sliced(pid, ""):
            return self._remove(pid, gen)

    def _remove(self, pid: int, gen: int) -> bool:
        try:
            pdir = DirFd(self.dofpid.fd, str(pid), readable=True)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise StashError("remove", f"PID {pid}", err.errno or errno.EIO) from err
        with pdir:
            try:
                st = os.lstat(str(gen), dir_fd=pdir.fd)
            except FileNotFoundError:
                return False
            if not stat.S_ISLNK(st.st_mode):
                raise StashError(
                    "remove", f"PID {pid} generation {gen}", errno.EINVAL, "not a symlink"
                )
            key = os.readlink(str(gen), dir_fd=pdir.fd)
            os.unlink(
                str(gen), dir_fd=pdir.fd
            )  # un-commit first: the rest is rolled back if we die
            gens = self._generations(pdir.fd)
            entry = self._index.get(pid)
            if entry is not None:
                entry.gens.pop(gen, None)
            if split_key(key) is not None and key not in gens.values():
                self._remove_mapping(pid, pdir.fd, key)
                if entry is not None:
                    self.usage.add(entry.uid, -entry.nprobes.pop(key, 0), -entry.raw.pop(key, 0))
            if not gens:
                self._remove_pid(pid)
        return True

    @staticmethod
    def _generations(pid_fd: int) -> dict[int, str]:
        gens = {}
        for item in os.scandir(pid_fd):
            if is_number(item.name) and item.is_symlink():
                gens[int(item.name)] = os.readlink(item.name, dir_fd=pid_fd)
        return gens

    def _remove_mapping(self, pid: int, pid_fd: int, key: str) -> None:
        """Remove one mapping directory, its probes/ links and, if unshared, its raw block."""
        try:
            mdir = DirFd(pid_fd, key, readable=True)
        except FileNotFoundError:
            mdir = None
        if mdir is not None:
            with mdir:
                self._remove_parsed(pid, pid_fd, mdir.fd, key)
            _remove_tree(pid_fd, key, self._tick_yield)
        self._drop_unused_raw(key)

    def _drop_unused_raw(self, key: str) -> None:
        for index in range(MAX_RAW_BLOCKS):
            shared = shared_raw_name(key, index)
            try:
                st = os.lstat(shared, dir_fd=self.dof.fd)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                _remove_tree(self.dof.fd, shared)
            elif st.st_nlink == 1:  # no mapping links it any more
                _unlink_quiet(self.dof.fd, shared)

    def _remove_parsed(self, pid: int, pid_fd: int, map_fd: int, key: str) -> None:
        """Delete parsed/* of one mapping (version first) and the probes/ links bound to them.

        A probes/ entry bound to this mapping's file is re-bound to the same
        probe of another mapping of the process, if one has it.
        """
        try:
            parsed = DirFd(map_fd, "parsed", readable=True)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            _unlink_quiet(map_fd, "parsed")
            return
        with parsed:
            _unlink_quiet(parsed.fd, "version")
            others = [n for n in os.listdir(pid_fd) if n != key and split_key(n) is not None]
            spid = str(pid)
            touched: set[tuple[str, ...]] = set()
            for item in list(os.scandir(parsed.fd)):
                parts = split_spec(item.name)
                if parts is not None and item.is_file(follow_symlinks=False):
                    self._unbind(pid_fd, spid, parts, item.inode(), others)
                    touched.add((spid, f"{parts[0]}{spid}", parts[1], parts[2]))
                _remove_tree(parsed.fd, item.name, self._tick)
                self._tick_yield()
            for path in sorted(touched):
                self._prune_empty(path)

    def _unbind(
        self,
        pid_fd: int,
        spid: str,
        parts: tuple[str, str, str, str],
        ino: int,
        others: list[str],
    ) -> None:
        prv, mod, fun, prb = parts
        try:
            fun_dir = self._open_probes_dir((spid, f"{prv}{spid}", mod, fun))
        except OSError:
            return
        with fun_dir:
            try:
                st = os.lstat(prb, dir_fd=fun_dir.fd)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_ino != ino:
                return  # bound to another mapping's file: leave it
            if st is not None:
                os.unlink(prb, dir_fd=fun_dir.fd)
            spec = probespec(*parts)
            for other in others:
                try:
                    with DirFd(pid_fd, other) as odir, DirFd(odir.fd, "parsed") as oparsed:
                        os.link(
                            spec,
                            prb,
                            src_dir_fd=oparsed.fd,
                            dst_dir_fd=fun_dir.fd,
                            follow_symlinks=False,
                        )
                    log.debug("probes entry %s of PID %s re-bound to mapping %s", spec, spid, other)
                    return
                except OSError:
                    continue

    def _prune_empty(self, path: tuple[str, ...]) -> None:
        """rmdir probes/<path…> and each now-empty parent, stopping at the first non-empty."""
        for depth in range(len(path), 0, -1):
            if not self._rmdir_probes(path[:depth]):
                return

    @_stash_op("remove-pid")
    def remove_pid(self, pid: int, *, may_defer: bool = False) -> None:
        """Every generation of *pid* (exit, exec, pid reuse).

        *may_defer* (an exit prune, which no client waits for): a
        :meth:`request_deferral` while it runs stops it at its next yield point
        with :class:`RemovalDeferred`.  Its generations are gone by then (no
        consumer finds the process), not all of its files: the caller sends it
        again once the registration has had the writer; start-up recovery removes
        a pid directory without generations too.  Only a top-level removal defers,
        never one nested in another command.
        """
        with self._sliced(pid, ""):
            self._deferrable = may_defer and self.busy == (pid, "") and not self._nested
            self._defer_requested = False
            try:
                self._remove_pid(pid)
            finally:
                self._deferrable = self._defer_requested = False

    def _remove_pid(self, pid: int) -> None:
        name = str(pid)
        entry = self._index.pop(pid, None)
        if entry is not None:
            self.usage.drop(entry)
        try:
            pdir = DirFd(self.dofpid.fd, name, readable=True)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            _remove_tree(self.dofpid.fd, name)  # a planted non-directory: unlinked, not followed
            _remove_tree(self.probes.fd, name)
            return
        with pdir:
            # un-commit every generation first; a crash after this is rolled back at start-up
            keys = set()
            # listed whole before anything is unlinked, and a name already gone is fine: CI
            # once saw ENOENT here for a generation symlink (a listing read across its own
            # unlinks returning a name again is one way; the cause is not pinned down)
            with os.scandir(pdir.fd) as listing:
                items = [(item.name, item.is_symlink()) for item in listing]
            for item_name, is_link in items:
                if is_number(item_name) and is_link:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(item_name, dir_fd=pdir.fd)
                elif split_key(item_name) is not None:
                    keys.add(item_name)
            for key in sorted(keys):
                self._unlink_by_names(name, pdir.fd, key)
            # what is left is removed by name where the writer knows what it made
            # (_remove_known): the tree removals list each directory, eight system
            # calls a listing, and are the fallback for anything unexpected
            _rmdir_or_tree(self.probes.fd, name, self._tick_yield)
            for key in sorted(keys):
                _remove_known(pdir.fd, key, _MAPPING_FILES, ("parsed",), self._tick_yield)
                self._drop_unused_raw(key)
            for item_name in _PID_FILES:
                try:
                    os.unlink(item_name, dir_fd=pdir.fd)
                except FileNotFoundError:
                    pass
                except OSError as err:  # not a file: _remove_tree takes what is left
                    if err.errno not in _NOT_AS_MADE:
                        raise
        _rmdir_or_tree(self.dofpid.fd, name, self._tick)

    def _unlink_by_names(self, spid: str, pid_fd: int, key: str) -> None:
        """Unlink mapping *key*'s parsed files and their probes/$pid entries by name.

        The names of ``parsed/`` say where each probes/ entry is
        (``prv:mod:fun:prb`` → ``<prv$pid>/<mod>/<fun>/<prb>``): one unlink each
        and one rmdir per emptied directory, where listing the probes/ tree
        costs an open, two reads and a close per ``<fun>`` directory (a
        20000-probe DOF often has 20000).  Directories are opened one component
        at a time (``O_NOFOLLOW``), as everywhere.  Only a head start: the
        caller's tree removals then take whatever is left (names that are no
        spec, a missing or planted entry this stops at); any other error is raised.
        """
        try:
            with DirFd(pid_fd, key) as mdir, DirFd(mdir.fd, "parsed", readable=True) as parsed:
                # the name policy is not needed to find our own entries: a name that is
                # no path component stops DirFd; the tree removals take what is left
                specs = sorted(
                    (parts[0], parts[1], parts[2], parts[3])
                    for parts in (name.split(":") for name in os.listdir(parsed.fd))
                    if len(parts) == 4
                )
                with DirFd(self.probes.fd, spid) as top:
                    self._unlink_specs(top.fd, spid, specs, parsed.fd)
                os.unlink("version", dir_fd=parsed.fd)  # parsed/ is then empty
        except OSError as err:
            if err.errno not in _NOT_AS_WRITTEN:
                raise

    def _unlink_specs(
        self, top: int, spid: str, specs: list[tuple[str, str, str, str]], parsed: int
    ) -> None:
        # <prv$pid>, <mod>, <fun> held open along the sorted specs' paths
        held: list[tuple[str, DirFd]] = []

        def leave(depth: int) -> None:
            while len(held) > depth:
                name, d = held.pop()
                d.close()
                try:
                    os.rmdir(name, dir_fd=held[-1][1].fd if held else top)
                except OSError as err:  # not empty: another mapping's entries stay
                    if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise

        try:
            for prv, mod, fun, prb in specs:
                path = (prv + spid, mod, fun)
                depth = 0
                while depth < len(held) and held[depth][0] == path[depth]:
                    depth += 1
                leave(depth)
                while len(held) < 3:
                    comp = path[len(held)]
                    held.append((comp, DirFd(held[-1][1].fd if held else top, comp)))
                try:  # noqa: SIM105  (contextlib.suppress costs a µs a probe here)
                    os.unlink(prb, dir_fd=held[2][1].fd)
                except FileNotFoundError:
                    pass  # another mapping of the process had it, or it was never linked
                os.unlink(probespec(prv, mod, fun, prb), dir_fd=parsed)
                self._tick_yield()
            leave(0)
        finally:
            for _, d in held:
                d.close()

    @_stash_op("prune")
    def prune_dead(self) -> list[int]:
        """Remove processes that are gone or have exec()ed since they registered.

        Gone: pid + start time, not ``kill(pid, 0)`` alone.  Exec: the stored
        exec token no longer matches the process's (an exec keeps the pid and
        the start time; without this its probes would stay until it exits, as
        upstream's do when the new image registers nothing).
        """
        self.progress.begin("prune")
        dead = []
        for pid in self._pids():
            if not self._alive(pid):
                dead.append(pid)
            self._tick()
        for pid in dead:
            log.debug("pruning dead/execed PID %i", pid)
            self._remove_pid(pid)
        return dead

    def _alive(self, pid: int) -> bool:
        stored = self._stored_identity(pid)
        start = stored[0] if stored is not None else None
        if start is None:
            # written by upstream's daemon (no xattr): its liveness test, kill(pid, 0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except OSError:
                return True
            return True
        if start_time_of(pid) != start:
            return False
        token = stored[1] if stored is not None else None
        if token:
            current = current_exec_token(pid)
            if current is not None and current != token:
                return False  # exec()ed: not the process that registered
        return True

    # ------------------------------------------------------------ reparse

    def reparse_scan(self, force: bool) -> list[ReparseItem]:
        items: list[ReparseItem] = []
        offset: int | None = 0
        while offset is not None:
            page, offset = self.reparse_scan_page(force, offset)
            items.extend(page)
        return items

    @_stash_op("reparse-scan")
    def reparse_scan_page(self, force: bool, offset: int) -> tuple[list[ReparseItem], int | None]:
        """Mappings to reparse from index *offset* on, within :data:`REPLY_BUDGET` bytes."""
        candidates = self._reparse_candidates(force)
        items: list[ReparseItem] = []
        used = 0
        for index in range(offset, len(candidates)):
            if items and used >= REPLY_BUDGET:
                return items, index
            item = self._read_item(*candidates[index])
            if item is not None:
                items.append(item)
                used += sum(len(block.data) for block in item.raw)
        return items, None

    def _reparse_candidates(self, force: bool) -> list[tuple[int, str]]:
        out: list[tuple[int, int, int, str]] = []
        for pid in self._pids():
            self._tick()
            with DirFd(self.dofpid.fd, str(pid), readable=True) as pdir:
                for key in set(self._generations(pdir.fd).values()):
                    ids = split_key(key)
                    if ids is None:
                        continue
                    if not force and self._version_current(pdir.fd, key):
                        continue
                    out.append((pid, *ids, key))
        out.sort()
        return [(pid, key) for pid, _, _, key in out]

    @staticmethod
    def _version_current(pid_fd: int, key: str) -> bool:
        try:
            with DirFd(pid_fd, key) as mdir, DirFd(mdir.fd, "parsed") as parsed:
                return read_small(parsed.fd, "version", 8) == VERSION_BYTES
        except OSError:
            return False

    def _read_item(self, pid: int, key: str) -> ReparseItem | None:
        ids = split_key(key)
        assert ids is not None
        try:
            with DirFd(self.dofpid.fd, str(pid)) as pdir, DirFd(pdir.fd, key) as mdir:
                dir_ino = os.fstat(mdir.fd).st_ino
                raw = read_small(mdir.fd, "raw", len(RAW_PREFIX) + DOF_MAXSZ)
                try:
                    rodata: bytes | None = read_small(
                        mdir.fd, raw_name(1), len(RAW_PREFIX) + DOF_MAXSZ
                    )
                except FileNotFoundError:
                    rodata = None
                helper = read_small(mdir.fd, "dh", HELPER_SIZE)
        except OSError as err:
            log.warning("%i: cannot read DOF in mapping %s for reparsing: %s", pid, key, err)
            return None
        legacy = raw[:4] == DOF_MAG_STRING  # an older daemon stored the DOF without a prefix
        blocks = [RawBlock(0, raw)] if legacy else [_block(raw)]
        if rodata is not None and not legacy:
            blocks.append(_block(rodata))
        if len(helper) != HELPER_SIZE or not all(b.data for b in blocks):
            log.warning("%i: mapping %s has a bad dh or raw file, not reparsed", pid, key)
            return None
        return ReparseItem(
            pid=pid,
            dev=ids[0],
            ino=ids[1],
            dir_ino=dir_ino,
            helper=helper,
            raw=blocks,
            legacy_raw=legacy,
        )

    def write_reparsed(self, item: ReparseItem, records: Sequence[ResultRecord] | None) -> None:
        """Replace one mapping's parsed files; None (parse failed): leave it with none."""
        probes = (
            None if records is None else self.check_records(records, "reparse", notes=item.notes)
        )
        self.write_reparsed_probes(item, probes)

    @_stash_op("reparse")
    def write_reparsed_probes(self, item: ReparseItem, probes: list[ParsedProbe] | None) -> None:
        key = mapping_key(item.dev, item.ino)
        entry = self._index.get(item.pid)
        if entry is None or key not in entry.nprobes:
            raise StashError("reparse", f"PID {item.pid} mapping {key}", errno.ENOENT)
        if probes is not None and len(probes) > entry.nprobes[key]:
            # a newer parser may find more probes in the same raw bytes
            delta, q, uid = len(probes) - entry.nprobes[key], self.quotas, entry.uid
            for what, value, limit in (
                ("probes of this process", entry.probes + delta, q.max_probes_per_pid),
                (
                    f"probes of uid {uid}",
                    self.usage.uid_probes.get(uid, 0) + delta,
                    q.max_probes_per_uid,
                ),
                ("probes in the stash", self.usage.probes + delta, q.max_probes_total),
            ):
                if value > limit:
                    raise self._quota_error(what, value, limit)
        try:
            with (
                DirFd(self.dofpid.fd, str(item.pid), readable=True) as pdir,
                DirFd(pdir.fd, key) as mdir,
            ):
                if os.fstat(mdir.fd).st_ino != item.dir_ino:
                    raise OSError(errno.ESTALE, "mapping directory replaced since the scan")
                self._remove_parsed(item.pid, pdir.fd, mdir.fd, key)
                self.usage.add(entry.uid, -entry.nprobes[key], 0)
                entry.nprobes[key] = 0
                if probes is None:
                    return
                # a failure here leaves the mapping unparsed (no version): the old
                # files were outdated anyway and the next start-up retries it
                with self._mkdir_open(mdir.fd, "parsed") as parsed, _Undo(self._reserve) as undo:
                    self._write_parsed(item.pid, parsed, probes, undo, undo_files=True)
                    undo.commit()
                entry.nprobes[key] = len(probes)
                self.usage.add(entry.uid, len(probes), 0)
        except OSError as err:
            raise StashError(
                "reparse",
                f"PID {item.pid} mapping {key}",
                err.errno or errno.EIO,
                os_detail(err),
            ) from err

    # ------------------------------------------------------------ recovery

    def _recover(self) -> list[str]:
        """Bring a tree left by a killed writer (or an older daemon) to a consistent state.

        Rolls back uncommitted mappings (no generation points at them), drops
        dangling generations, fixes next-gen, removes unreferenced raw blocks
        and probes/ entries whose parsed file is gone, relinks missing probes/
        entries of fully written mappings, and removes partial parsed files of
        mappings whose ``parsed/version`` is missing (they are reparsed).
        """
        actions: list[str] = []
        for pid in self._pids():
            self._recover_pid(pid, actions)
            self._tick()
        self._recover_probes(actions)
        with os.scandir(self.dof.fd) as listing:
            shared = list(listing)  # whole, before anything is unlinked
        for item in shared:
            st = item.stat(follow_symlinks=False)
            if split_shared_raw_name(item.name) is None or not stat.S_ISREG(st.st_mode):
                continue  # not ours: verify reports it
            if st.st_nlink == 1:
                actions.append(f"removed unreferenced stash/dof/{item.name}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(item.name, dir_fd=self.dof.fd)
        for action in actions[:_MAX_RECOVERY_LINES]:
            log.info("stash recovery: %s", action)
        if len(actions) > _MAX_RECOVERY_LINES:
            log.info(
                "stash recovery: … and %d more actions (%d in all)",
                len(actions) - _MAX_RECOVERY_LINES,
                len(actions),
            )
        return actions

    def _recover_pid(self, pid: int, actions: list[str]) -> None:
        with DirFd(self.dofpid.fd, str(pid), readable=True) as pdir:
            gens = self._generations(pdir.fd)
            keys = {n for n in os.listdir(pdir.fd) if split_key(n) is not None}
            for gen, target in sorted(gens.items()):
                if target not in keys:
                    os.unlink(str(gen), dir_fd=pdir.fd)
                    del gens[gen]
                    actions.append(f"PID {pid}: removed dangling generation {gen}")
            live = set(gens.values())
            for key in sorted(keys - live):
                self._remove_mapping(pid, pdir.fd, key)
                actions.append(f"PID {pid}: rolled back uncommitted mapping {key}")
            if not gens:
                self._remove_pid(pid)
                actions.append(f"PID {pid}: removed (no generations)")
                return
            self._recover_next_gen(pid, pdir.fd, max(gens) + 1, actions)
            for key in sorted(live):
                with DirFd(pdir.fd, key) as mdir:
                    if self._has_version(mdir.fd):
                        self._relink_probes(pid, mdir.fd, actions)
                    else:
                        self._remove_parsed(pid, pdir.fd, mdir.fd, key)

    @staticmethod
    def _has_version(map_fd: int) -> bool:
        try:
            os.lstat("parsed/version", dir_fd=map_fd)
        except OSError:
            return False
        return True

    def _recover_next_gen(self, pid: int, pid_fd: int, needed: int, actions: list[str]) -> None:
        try:
            fd, _ = _open_in_place(pid_fd, "next-gen")
        except OSError as err:
            if err.errno != errno.ENOENT:
                # planted link or non-file: never written through; verify reports it
                log.warning("stash recovery: PID %i: next-gen left alone: %s", pid, err)
                return
            fd = -1
        if fd < 0:
            fd = os.open(
                "next-gen",
                os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FILE,
                FILE_MODE,
                dir_fd=pid_fd,
            )
            if self._fix_modes:
                os.fchmod(fd, FILE_MODE)
        try:
            if os.fstat(fd).st_size < needed:
                os.ftruncate(fd, needed)
                actions.append(f"PID {pid}: next-gen raised to {needed}")
        finally:
            os.close(fd)

    def _relink_probes(self, pid: int, map_fd: int, actions: list[str]) -> None:
        """Finish: every parsed file of a complete mapping has its probes/ entry."""
        try:
            parsed = DirFd(map_fd, "parsed", readable=True)
        except OSError:
            return
        spid = str(pid)
        with parsed:
            for item in os.scandir(parsed.fd):
                self._tick()
                parts = split_spec(item.name)
                if parts is None or not item.is_file(follow_symlinks=False):
                    continue
                prv, mod, fun, prb = parts
                try:
                    os.lstat(f"{spid}/{prv}{spid}/{mod}/{fun}/{prb}", dir_fd=self.probes.fd)
                    continue
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
                try:
                    d = self.probes
                    held = []
                    for comp in (spid, f"{prv}{spid}", mod, fun):
                        nd = self._mkdir_open(d.fd, comp)
                        held.append(nd)
                        d = nd
                    try:
                        os.link(
                            item.name,
                            prb,
                            src_dir_fd=parsed.fd,
                            dst_dir_fd=d.fd,
                            follow_symlinks=False,
                        )
                    finally:
                        for h in held:
                            h.close()
                    actions.append(f"PID {pid}: relinked probes entry for {item.name}")
                except OSError as err:
                    log.warning("cannot relink %s: %s", printable(item.name), err)

    def _recover_probes(self, actions: list[str]) -> None:
        """probes/ entries of unknown processes, or whose parsed file is gone."""
        for item in os.scandir(self.probes.fd):
            if not is_number(item.name):
                continue  # not ours: verify reports it
            if not item.is_dir(follow_symlinks=False):
                continue
            try:
                os.lstat(item.name, dir_fd=self.dofpid.fd)
            except FileNotFoundError:
                _remove_tree(self.probes.fd, item.name, self._tick)
                actions.append(f"removed probes/{item.name} of an unknown process")
                continue
            self._drop_orphan_links(self.probes.fd, item.name, 4, actions)

    def _drop_orphan_links(self, parent: int, name: str, depth: int, actions: list[str]) -> bool:
        """Remove leaves with link count 1 and then-empty dirs; True if *name* was removed."""
        with DirFd(parent, name, readable=True) as d:
            for item in list(os.scandir(d.fd)):
                if depth > 0 and item.is_dir(follow_symlinks=False):
                    self._drop_orphan_links(d.fd, item.name, depth - 1, actions)
                elif (
                    depth == 0
                    and item.is_file(follow_symlinks=False)
                    and item.stat(follow_symlinks=False).st_nlink == 1
                ):
                    os.unlink(item.name, dir_fd=d.fd)
                    actions.append(f"removed orphan probes entry {printable(item.name)}")
                self._tick()
            empty = not os.listdir(d.fd)
        if empty:
            os.rmdir(name, dir_fd=parent)
            return True
        return False

    # ------------------------------------------------------------ verify

    @_stash_op("verify")
    def verify(self) -> list[str]:
        return verify_tree(self.root.fd, self._tick)
