"""Catch-up: register the probes of running programs the daemon never heard from.

A USDT program registers once, from its constructor (and again in each fork
child).  Started while no daemon served the helper, it has no probes until it
is restarted.  Catch-up scans ``/proc`` and registers, on each process's
behalf, every mapped object that carries probes and that the process has not
registered: exactly what its constructor would have sent (docs/operations.md,
"Catch-up").  It runs on the maintenance thread (:class:`~dtprobed.daemon.main.Maintenance`),
one object per writer exchange, so registrations keep being served meanwhile.

Per process, in this order (any failure skips the process, or the object, and
leaves nothing behind):

1. a pidfd first: everything read afterwards is checked against it, so a pid
   reused mid-scan is never registered under the wrong process;
2. ``/proc/PID/stat``: kernel threads (``PF_KTHREAD``) and our own children
   (parser, stash writer, fetch helpers: our parent pid and our interpreter) are
   skipped;
3. ``/proc/PID/environ`` (at most :data:`MAX_ENVIRON` bytes; larger: skipped):
   ``DTRACE_DOF_INIT_DISABLE`` set → skipped, as drti would have done nothing;
   ``DTRACE_DOF_INIT_DEVNAME`` (default ``/dev/dtrace/helper``) is resolved
   under ``/proc/PID/root`` (a relative name under ``/proc/PID/cwd``) and must
   be the helper we serve (same character device, or same ``(st_dev, st_ino)``
   for a FUSE file) → otherwise skipped: another daemon's process is not ours.
   A process in our mount namespace, with our root, naming our very path is
   ours without a ``stat``; any other path is ``stat``ed in a child process
   abandoned after :data:`STAT_TIMEOUT` (the path may cross a FUSE mount whose
   server never answers);
4. ``/proc/PID/maps``: each distinct file with an executable mapping, not
   already registered by this process (its ``dof-pid/$pid`` keys, when that
   directory is this process's: same start time), is opened through
   ``/proc/PID/map_files`` of its first mapping with the dev/ino check of
   :func:`~dtprobed.daemon.identity.identify_object`, and located in the
   sandboxed parser (``LocateNotes`` with ``dof``): ``.note.usdt`` → the
   HASUSDT path with an address inside the object; ``.SUNW_dof`` (allocated)
   → the DOF is read from the process's memory at its run-time address
   (``dofhp_addr + sh_addr`` for ET_DYN, ``sh_addr`` for ET_EXEC), through the
   fetch helper, and registered as old drti's ADDDOF would have: ``dofhp_mod``
   the object's basename, ``dofhp_addr`` the load base (0 for ET_EXEC),
   ``dofhp_dof`` that address.  An object with both is registered by its notes.
   The locate answer is kept per ``(dev, ino)`` for the rest of the scan (libc
   is located once, not once per process).
5. after each registration, the process must still map the object where it did
   and not have exec'd (its exec token): otherwise the generation is removed
   again.  A process that exits meanwhile is pruned by the exit watcher, as any.

Registrations are marked ``caught_up`` (docs/stash.md, "Catch-up"): a new
``dof-pid/$pid`` starts at generation 1, because the process holds 0 or -1 from
its failed ioctl and may send REMOVE with it; the writer answers the existing
generation when the process registered the object itself meanwhile, and a live
registration of an object replaces its caught-up generation.  A REMOVE of 0 or
-1 from a process with caught-up generations (:meth:`CatchUp.on_ambiguous_remove`)
removes only registrations whose object is no longer mapped, at once and (as for
every process) at the next periodic prune: a destructor's REMOVE comes before its
object is unmapped.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from common.errors import DtprobedError
from common.records import NotesLocation
from dtprobed.daemon import unmapped
from dtprobed.daemon.identity import AddressSpace, Mapping, fuse_devices, open_object
from dtprobed.oslib.pidfd import pidfd_exited
from dtprobed.oslib.procfs import current_exec_token, read_proc
from dtprobed.stash.layout import (
    XATTR_CAUGHT_UP,
    XATTR_EXEC_TOKEN,
    XATTR_START_TIME,
    parse_caught_up,
    split_key,
)

DEFAULT_HELPER: Final = "/dev/dtrace/helper"
_DELETED: Final = " (deleted)"
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
ENV_DISABLE: Final = b"DTRACE_DOF_INIT_DISABLE"
ENV_DEVNAME: Final = b"DTRACE_DOF_INIT_DEVNAME"
#: A process whose environment is larger is skipped (its wishes can't be read whole).
MAX_ENVIRON: Final = 1 << 20
#: ``PF_KTHREAD`` in field 9 of ``/proc/PID/stat`` (include/linux/sched.h).
PF_KTHREAD: Final = 0x00200000
#: A REMOVE of one of these from a process whose constructor got no answer is ambiguous.
AMBIGUOUS_GENS: Final = frozenset({0, -1})

log = logging.getLogger("dtprobed.catchup")


class Registrar(Protocol):
    """What catch-up needs of the receiver (:class:`~dtprobed.daemon.receiver.Receiver`)."""

    def catch_up_locate(
        self, module: str, first_start: int, size: int, read: Callable[[int, int], bytes]
    ) -> NotesLocation: ...
    def catch_up_notes(self, pid: int, address: int) -> int: ...
    def catch_up_dof(
        self,
        pid: int,
        module: str,
        load_base: int,
        dof_addr: int,
        max_size: int,
        key: tuple[int, int],
    ) -> int: ...
    def remove_generation(self, pid: int, gen: int) -> bool: ...


class _Skip(Exception):
    """This process (or object) is skipped; the message is the reason, in the summary."""


@dataclass
class Summary:
    """One catch-up run: counts for its log line and the completion marker."""

    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0
    processes: int = 0
    registered: int = 0
    present: int = 0  # objects found registered already (by the process, or earlier)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    stopped: bool = False

    def line(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return (
            f"catch-up: {self.processes} processes scanned, {self.registered} objects registered, "
            f"{sum(self.skipped.values())} skipped" + (f" ({reasons})" if reasons else "")
            + (", stopped early" if self.stopped else "")
        )  # fmt: skip

    def as_json(self) -> dict[str, object]:
        return {
            "started": self.started,
            "finished": self.finished,
            "processes": self.processes,
            "registered": self.registered,
            "already_registered": self.present,
            "skipped": dict(self.skipped),
            "stopped": self.stopped,
            "summary": self.line(),
        }


@dataclass(frozen=True)
class _Located:
    """What one object carries: notes (registered by address) or DOF at ``dof_addr``."""

    notes: bool
    dof_addr: int  # sh_addr of .SUNW_dof
    dof_size: int
    dynamic: bool  # ET_DYN: addresses are relative to the load base


def boot_ticks() -> int:
    """Now, in the clock ticks since boot of ``/proc/PID/stat``'s start time (CLOCK_BOOTTIME)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLOCK_TICKS)


#: How long a helper path's ``stat`` (in a child process) may take.
STAT_TIMEOUT: Final = 2.0
#: The child: prints :func:`helper_identity` of argv[1] ("chr RDEV 0" or "file DEV INO").
_STAT_HELPER: Final = (
    "import os, stat, sys\n"
    "st = os.stat(sys.argv[1])\n"
    "print('chr', st.st_rdev, 0) if stat.S_ISCHR(st.st_mode)"
    " else print('file', st.st_dev, st.st_ino)\n"
)


def helper_identity(path: str) -> tuple[str, int, int]:
    """What makes two paths the same helper: the character device, or the file's inode."""
    st = os.stat(path)
    if stat.S_ISCHR(st.st_mode):
        return ("chr", st.st_rdev, 0)
    return ("file", st.st_dev, st.st_ino)


def parse_environ(data: bytes) -> dict[bytes, bytes]:
    """The two variables drti reads, from a NUL-separated environment (first wins, as getenv)."""
    found: dict[bytes, bytes] = {}
    for entry in data.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if eq and name in (ENV_DISABLE, ENV_DEVNAME) and name not in found:
            found[name] = value
    return found


def _stat_fields(data: bytes) -> tuple[int, int, int]:
    """(ppid, flags, start time) of ``/proc/PID/stat``; ``ValueError`` if it is not one."""
    close = data.rfind(b")")
    fields = data[close + 1 :].split() if close >= 0 else []
    if len(fields) < 20:
        raise ValueError("short /proc/PID/stat")
    return int(fields[1]), int(fields[6]), int(fields[19])


def objects_of(space: AddressSpace) -> dict[tuple[int, int], Mapping]:
    """Each file with an executable mapping → its lowest mapping (where its load base is).

    Only code can hold probe sites, so files never mapped executable (data,
    locale archives, fonts) are not looked at.
    """
    first: dict[tuple[int, int], Mapping] = {}
    executable: set[tuple[int, int]] = set()
    for m in space.mappings:
        if not m.file_backed:
            continue
        key = (m.dev, m.ino)
        if key not in first:
            first[key] = m
        if m.executable:
            executable.add(key)
    return {key: m for key, m in first.items() if key in executable}


class CatchUp:
    """Scans ``/proc`` for unregistered objects with probes and registers them."""

    def __init__(
        self,
        registrar: Registrar,
        *,
        remover: unmapped.Remover,
        device: str,
        state_dir: str,
        max_dof_size: int,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self._registrar = registrar
        self._remover = remover
        self._state_dir = state_dir
        self._device = device
        self._dofpid = os.path.join(state_dir, "stash", "dof-pid")
        self._max_dof_size = max_dof_size
        self._stopping = stopping
        self._fuse_by_ns: dict[int, frozenset[int]] = {}
        self._own_pid = os.getpid()
        own = os.stat("/proc/self/exe")
        self._own_exe = (own.st_dev, own.st_ino)
        self._started_before: int | None = None
        self._device_bytes = os.fsencode(device)
        self._our_view: tuple[int, str] = (-1, "")
        #: helper-path stats that outlived STAT_TIMEOUT: reaped when they end
        self._abandoned: list[subprocess.Popen[bytes]] = []
        self._helper_seen: dict[tuple[int, str, bytes], tuple[str, int, int] | None] = {}

    def _open_pid_dir(self, pid: int) -> int | None:
        """A read-only fd on ``dof-pid/$pid`` (never through a symlink), None if absent."""
        try:
            return os.open(
                os.path.join(self._dofpid, str(pid)),
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            )
        except OSError:
            return None

    # --- one run ------------------------------------------------------------------

    def run(self, started_before: int | None = None) -> Summary:
        """Scan every process once; logs progress and the summary line.

        *started_before* (the start-up run): skip processes whose start time
        (clock ticks since boot, as ``/proc/PID/stat``) is later than this, the
        tick the helper began to be served in: their constructors reach us (an
        ADDDOF waits in the device until the main loop serves it), and catching
        them up too would race with that registration (no duplicate, but the
        process would hold generation 2, not 0).
        """
        self._started_before = started_before
        summary = Summary()
        try:
            self._our_view = (os.stat("/proc/self/ns/mnt").st_ino, os.readlink("/proc/self/root"))
        except OSError:
            self._our_view = (-1, "")  # never equal: every helper path gets its stat
        self._helper_seen = {}
        self._abandoned = [proc for proc in self._abandoned if proc.poll() is None]
        try:
            ours = helper_identity(self._device)
        except OSError as err:
            # while stopping, the device closed under us (our FUSE helper answers no more)
            (log.info if self._stopping() else log.error)(
                "catch-up: cannot stat our helper %s: %s", self._device, err
            )
            summary.skipped["our helper unreadable"] += 1
            summary.finished = time.monotonic()
            return summary
        cache: dict[tuple[int, int], _Located | None] = {}
        self._fuse_by_ns = {}
        pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
        log.info("catch-up: scanning %d processes", len(pids))
        for pid in pids:
            if self._stopping():
                summary.stopped = True
                break
            if pid == self._own_pid:
                continue
            summary.processes += 1
            try:
                self._process(pid, ours, cache, summary)
            except _Skip as skip:
                summary.skipped[str(skip)] += 1
        summary.finished = time.monotonic()
        log.info("%s (%.1f s)", summary.line(), summary.finished - summary.started)
        return summary

    def _process(
        self,
        pid: int,
        ours: tuple[str, int, int],
        cache: dict[tuple[int, int], _Located | None],
        summary: Summary,
    ) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as err:
            raise _Skip("exited" if err.errno == errno.ESRCH else "unreadable") from err
        try:
            try:
                ppid, flags, start_time = _stat_fields(read_proc(f"/proc/{pid}/stat"))
            except (OSError, ValueError) as err:
                raise _Skip("exited or unreadable") from err
            if flags & PF_KTHREAD:
                raise _Skip("kernel threads")
            if self._started_before is not None and start_time > self._started_before:
                raise _Skip("started while we served")
            if ppid == self._own_pid and self._same_program(pid):
                raise _Skip("ours")
            self._check_wishes(pid, ours)
            try:
                space = AddressSpace.from_maps(read_proc(f"/proc/{pid}/maps"))
            except (OSError, ValueError) as err:
                raise _Skip("exited or unreadable") from err
            if pidfd_exited(pidfd):
                raise _Skip("exited")  # what we read may be a new process's: the pid was reused
            objects = objects_of(space)
            if not objects:
                return
            have = self._registered_keys(pid, start_time)
            for (dev, ino), first in objects.items():
                if self._stopping():
                    return
                if (dev, ino) in have:
                    summary.present += 1
                    continue
                self._object(pid, first, cache, summary)
        finally:
            os.close(pidfd)

    def _same_program(self, pid: int) -> bool:
        """*pid* runs our interpreter: one of our children (parser, writer, fetch helper)."""
        try:
            theirs = os.stat(f"/proc/{pid}/exe")
        except OSError:
            return False
        return (theirs.st_dev, theirs.st_ino) == self._own_exe

    def _check_wishes(self, pid: int, ours: tuple[str, int, int]) -> None:
        """Skip a process whose environment says drti would not have registered with us."""
        try:
            env = parse_environ(read_proc(f"/proc/{pid}/environ", MAX_ENVIRON))
        except OSError as err:
            if err.errno == errno.EFBIG:
                raise _Skip(f"environment over {MAX_ENVIRON} bytes") from err
            raise _Skip("exited or unreadable") from err
        if ENV_DISABLE in env:
            raise _Skip("DTRACE_DOF_INIT_DISABLE")
        name = env.get(ENV_DEVNAME, DEFAULT_HELPER.encode())
        if not name or b"\0" in name:
            raise _Skip("another helper")
        if name == self._device_bytes and self._sees_as_we_do(pid):
            return  # our path, resolved in our mount namespace from our root: our helper
        if self._their_helper(pid, name) != ours:
            raise _Skip("another helper")

    def _sees_as_we_do(self, pid: int) -> bool:
        """*pid* has our mount namespace and our root, so a path means there what it means here.

        Spares a ``stat`` of the helper per process (in FUSE mode a request to
        our own device) for the processes that name the very path we serve.
        The root is compared by ``readlink`` (the kernel's name for it, from
        our root), not ``stat``: a root on a FUSE file system would make a
        ``stat`` a request to its server.
        """
        try:
            mnt = os.stat(f"/proc/{pid}/ns/mnt").st_ino  # nsfs: asks no file system
            root = os.readlink(f"/proc/{pid}/root")
        except OSError:
            return False
        return (mnt, root) == self._our_view

    def _their_helper(self, pid: int, name: bytes) -> tuple[str, int, int] | None:
        """:func:`helper_identity` of *name* as process *pid* resolves it; None: unresolvable.

        The path may cross any file system, including a FUSE mount whose
        server never answers, and a thread waiting there can be neither
        cancelled nor killed: so the ``stat`` runs in a child process, abandoned
        after :data:`STAT_TIMEOUT`.  One per mount namespace, root and name in
        a run.
        """
        absolute = name.startswith(b"/")
        where = f"/proc/{pid}/root" if absolute else f"/proc/{pid}/cwd/"
        path = where + name.decode("utf-8", "surrogateescape")
        key: tuple[int, str, bytes] | None = None
        if absolute:
            try:
                key = (os.stat(f"/proc/{pid}/ns/mnt").st_ino, os.readlink(where), name)
            except OSError:
                return None
            if key in self._helper_seen:
                return self._helper_seen[key]
        found = self._stat_in_child(path)
        if key is not None:
            self._helper_seen[key] = found
        return found

    def _stat_in_child(self, path: str) -> tuple[str, int, int] | None:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _STAT_HELPER, path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            out, _ = proc.communicate(timeout=STAT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()  # it may stay, in the kernel, until that file system answers
            self._abandoned.append(proc)
            raise _Skip("helper path not answering") from None
        fields = out.split()
        if proc.returncode != 0 or len(fields) != 3:
            return None
        return (fields[0].decode(), int(fields[1]), int(fields[2]))

    def _registered_keys(self, pid: int, start_time: int) -> set[tuple[int, int]]:
        """The (dev, ino) this process has registered (its dof-pid directory, if it is its)."""
        fd = self._open_pid_dir(pid)
        if fd is None:
            return set()
        try:
            try:
                stored = os.getxattr(fd, XATTR_START_TIME)
            except OSError:
                stored = b""
            if stored and stored != str(start_time).encode():
                return set()  # an earlier process of that pid: the writer prunes it
            keys = set()
            for entry in os.scandir(fd):
                if entry.is_symlink():
                    with_key = split_key(os.readlink(entry.name, dir_fd=fd))
                    if with_key is not None:
                        keys.add(with_key)
            return keys
        except OSError:
            return set()
        finally:
            os.close(fd)

    def _object(
        self,
        pid: int,
        first: Mapping,
        cache: dict[tuple[int, int], _Located | None],
        summary: Summary,
    ) -> None:
        """Locate (once per file per run) and register one object of *pid*.

        A file already located in this run is not opened again: within one
        scan an inode is taken to hold what it held when first located.
        """
        key = (first.dev, first.ino)
        if key in cache:
            located = cache[key]
        else:
            try:
                fuse = self._fuse_of(pid)
                if first.dev in fuse:
                    log.debug("catch-up: %d: %s is on a FUSE file system", pid, first.path)
                    summary.skipped["objects on FUSE file systems"] += 1
                    return
                obj = open_object(pid, first, fuse)
            except DtprobedError as err:
                log.debug("catch-up: %d: %s: %s", pid, first.path, err)
                summary.skipped["objects unreadable"] += 1
                return
            try:
                located = cache[key] = self._locate(obj.module, first, obj.size, obj.fd)
            finally:
                obj.close()
        if located is None:
            return
        name = first.path.removesuffix(_DELETED)
        try:
            gen = self._register(pid, first, os.path.basename(name) or name, located)
        except DtprobedError as err:
            log.warning("catch-up: %d: %s not registered: %s", pid, first.path, err)
            summary.skipped["objects refused"] += 1
            return
        if not self._still_there(pid, first):
            # exec'd or unmapped while we registered it: nothing may stay behind
            self._registrar.remove_generation(pid, gen)
            summary.skipped["objects gone meanwhile"] += 1
            return
        if gen not in self._caught_up_gens(pid):
            # the process registered it itself meanwhile: the writer answered that generation
            summary.present += 1
            log.info("catch-up: %d: %s registered by the process meanwhile", pid, first.path)
            return
        summary.registered += 1
        log.info("catch-up: %d: registered %s as generation %d", pid, first.path, gen)

    def _fuse_of(self, pid: int) -> frozenset[int]:
        """:func:`fuse_devices` of *pid*, read once per mount namespace in a run."""
        try:
            ns = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        except OSError:
            ns = -pid  # unknown: read its own
        found = self._fuse_by_ns.get(ns)
        if found is None:
            found = self._fuse_by_ns[ns] = fuse_devices(pid)
        return found

    def _locate(self, module: str, first: Mapping, size: int, fd: int) -> _Located | None:
        def read(offset: int, count: int) -> bytes:
            return os.pread(fd, count, offset)

        try:
            where = self._registrar.catch_up_locate(module, first.start, size, read)
        except DtprobedError as err:
            log.debug("catch-up: %s: no probes: %s", first.path, err)
            return None
        except OSError as err:
            log.debug("catch-up: %s: unreadable: %s", first.path, err)
            return None
        return _Located(where.notes_found, where.dof_addr, where.dof_size, where.base != 0)

    def _register(self, pid: int, first: Mapping, module: str, located: _Located) -> int:
        if located.notes:
            return self._registrar.catch_up_notes(pid, first.start)
        base = first.start if located.dynamic else 0
        return self._registrar.catch_up_dof(
            pid,
            module,
            base,
            base + located.dof_addr,
            min(located.dof_size, self._max_dof_size),
            (first.dev, first.ino),
        )

    def _still_there(self, pid: int, first: Mapping) -> bool:
        """*pid* still maps *first* where it did and has not exec'd since its registration."""
        try:
            space = AddressSpace.from_maps(read_proc(f"/proc/{pid}/maps"))
        except (OSError, ValueError):
            return False
        now = space.find(first.start)
        if now is None or (now.dev, now.ino) != (first.dev, first.ino):
            return False
        token = current_exec_token(pid)
        stored = self._stored_token(pid)
        return token is None or stored is None or token == stored

    def _stored_token(self, pid: int) -> str | None:
        fd = self._open_pid_dir(pid)
        if fd is None:
            return None
        try:
            return os.getxattr(fd, XATTR_EXEC_TOKEN).decode("ascii", "replace")
        except OSError:
            return None
        finally:
            os.close(fd)

    # --- REMOVE of 0 or -1, and the objects a caught-up process unmapped ----------------

    def caught_up(self, pid: int) -> bool:
        """True when *pid* has (or had) generations registered by catch-up."""
        return bool(self._caught_up_gens(pid))

    def _caught_up_gens(self, pid: int) -> set[int]:
        fd = self._open_pid_dir(pid)
        if fd is None:
            return set()
        try:
            return parse_caught_up(os.getxattr(fd, XATTR_CAUGHT_UP))
        except OSError:
            return set()
        finally:
            os.close(fd)

    def on_ambiguous_remove(self, pid: int) -> int | None:
        """A REMOVE of 0 or -1 from *pid*: None if it is not caught up (the usual REMOVE).

        Otherwise removes only the registrations whose object *pid* no longer
        maps (:func:`dtprobed.daemon.unmapped.drop_unmapped`, with its identity
        checks) and answers how many; never one whose object is still mapped.
        A destructor's REMOVE comes before its object is unmapped: what it
        meant goes at the next periodic prune, which runs the same check.
        """
        if not self.caught_up(pid):
            return None
        return len(unmapped.drop_unmapped(self._state_dir, self._remover, pids=[pid]))
