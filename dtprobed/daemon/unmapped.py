"""Generations whose object their process no longer maps: found and dropped at the prune.

Why: a library's probes are meant to go when it is ``dlclose()``d — its
destructor sends ``DTRACEHIOC_REMOVE`` — but in FUSE mode that ioctl never
reaches the daemon (the generation is passed by value and the kernel's
restricted ioctl fails it with EFAULT: docs/protocol.md), and in either mode a
process can unmap an object without a REMOVE (a libusdt provider freed without
``usdt_provider_disable``, a destructor that never ran).  Without this, such
probes stay in the stash until the process exits.  The periodic prune (every
``--prune-interval`` seconds, :class:`dtprobed.daemon.main.Maintenance`) calls
:func:`drop_unmapped` after pruning dead processes, in both device modes: a
REMOVE, when it arrives, comes before the unmapping (the destructor runs
first), so in CUSE mode this only ever finds what no REMOVE will remove.

When a generation's object counts as unmapped (decided from one reading of
``/proc/PID/maps``, whose ``MM:mm`` device field, glibc-encoded, is what the
stash key was made from — never ``stat``, which differs on overlayfs):

* a file-backed key ``$dev-$ino`` (DOF in an ELF object's data, or a
  ``.note.usdt`` object): no mapping of that (dev, ino) is left;
* an anonymous key ``0-<dofhp_dof>`` (libusdt): the DOF's own memory says
  nothing (libusdt may free or reuse its DOF buffer once registered, and heap
  pages stay mapped anyway), so the test is the probe code: none of the
  tracepoints in the generation's parsed files lies in an executable,
  file-backed mapping any more (libusdt unmaps its tracepoint code when a
  provider is disabled).  A mapping without parsed files or without any
  tracepoint is kept: nothing proves it gone.

Never drop a still-mapped object, nor another registration.  For each process:

1. the process must be the registered one — a pidfd is opened, and its start
   time (``/proc/PID/stat``) and exec token (``/proc/PID/auxv``) must equal
   the stash's ``trusted.dtprobed.*`` xattrs; a directory without a start
   time (written by upstream's daemon) is skipped;
2. its generations are read **before** its maps, so every generation looked
   at was registered while its object was mapped: not finding it mapped
   afterwards means it was unmapped since;
3. after the decision the identity is checked again (pidfd not readable,
   start time and exec token unchanged) and each generation's symlink must
   still name the same mapping; only then is each removed through the
   writer's ``Remove`` (:meth:`StashWriterChild.remove`), which un-commits
   the generation first and takes the mapping directory with its last
   generation.  All generations of one unmapped object are removed (a
   mapping registered twice has two); the first failure stops that process's
   removals and is logged (the rest are found again at the next prune).

Known limit: between step 3 and the writer running the ``Remove`` there is a
window of one writer command; a process that in that window exec()s and
registers as many objects again (generations restart at 0 after an exec)
could lose the new registration of the same number.  Generations dropped
here are ≥ 1 in the ordinary case (the executable's own is 0), so this takes
an exec plus two registrations inside one writer exchange.

Generation numbers are never reused within one image (``next-gen`` only
grows), so a REMOVE of a generation dropped here that arrives later (CUSE)
is an unknown generation: answered 0, nothing removed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from common.dof_abi import DOF_HELPER
from common.errors import DtprobedError, StashFormatError
from common.stash_format import decode_probe_file
from dtprobed.daemon.identity import AddressSpace
from dtprobed.oslib.dirfd import DirFd
from dtprobed.oslib.pidfd import pidfd_exited
from dtprobed.oslib.procfs import current_exec_token, read_proc, start_time_of
from dtprobed.stash.layout import (
    HELPER_SIZE,
    XATTR_EXEC_TOKEN,
    XATTR_START_TIME,
    is_number,
    read_small,
    split_key,
    split_spec,
)

log = logging.getLogger("dtprobed")

#: A parsed file larger than this is not one the writer made (quotas bound probes, and a
#: probe's tracepoints are 16 bytes each).
MAX_PARSED_FILE: Final = 1 << 26


class Remover(Protocol):
    def remove(self, pid: int, gen: int) -> bool: ...


@dataclass(frozen=True)
class Unmapped:
    """One object of process ``pid`` no longer mapped, and its generations in the stash."""

    pid: int
    key: str  # "$dev-$ino" (0-<dofhp_dof> for anonymous DOF)
    gens: tuple[int, ...]
    module: str  # dofhp_mod of its dof_helper_t, for the log ("?" if unreadable)


@dataclass(frozen=True)
class _Identity:
    start_time: int
    exec_token: str | None  # None: not stored (then only the start time is compared)


def _xattr(fd: int, name: str) -> str | None:
    try:
        return os.getxattr(fd, name).decode("ascii")
    except (OSError, UnicodeError):
        return None


def _stored_identity(pid_fd: int) -> _Identity | None:
    start = _xattr(pid_fd, XATTR_START_TIME)
    if start is None or not start.isdigit():
        return None
    return _Identity(int(start), _xattr(pid_fd, XATTR_EXEC_TOKEN) or None)


def _is_registered_process(pid: int, pidfd: int, ident: _Identity) -> bool:
    """The running *pid* (held by *pidfd*) is the image that registered (stash identity)."""
    if pidfd_exited(pidfd) or start_time_of(pid) != ident.start_time:
        return False
    return ident.exec_token is None or current_exec_token(pid) == ident.exec_token


def _generations(pid_fd: int) -> dict[int, str]:
    """``$gen -> $dev-$ino`` symlinks of one process directory (unreadable ones skipped)."""
    out: dict[int, str] = {}
    for name in os.listdir(pid_fd):
        if not is_number(name):
            continue
        try:
            target = os.readlink(name, dir_fd=pid_fd)
        except OSError:
            continue  # removed meanwhile, or not a symlink (verify's business)
        if split_key(target) is not None:
            out[int(name)] = target
    return out


def _tracepoints(pid_fd: int, key: str) -> Iterable[int]:
    """Tracepoint addresses of one mapping's parsed files (unreadable files skipped)."""
    try:
        with DirFd(pid_fd, key) as mdir:
            parsed = DirFd(mdir.fd, "parsed", readable=True)
    except OSError:
        return
    with parsed:
        for name in os.listdir(parsed.fd):
            if split_spec(name) is None:
                continue
            try:
                pf = decode_probe_file(read_small(parsed.fd, name, MAX_PARSED_FILE))
            except (OSError, StashFormatError):
                continue
            for tp in pf.tracepoints:
                yield tp.addr


def _object_mapped(space: AddressSpace, files: set[tuple[int, int]], pid_fd: int, key: str) -> bool:
    """*files*: the (dev, ino) of every file-backed mapping of *space*."""
    dev, ino = split_key(key) or (0, 0)
    if dev != 0:
        return (dev, ino) in files
    seen = False
    for addr in _tracepoints(pid_fd, key):
        seen = True
        m = space.find(addr)
        if m is not None and m.executable and m.file_backed:
            return True
    return not seen  # nothing proves an anonymous registration without tracepoints gone


def _module(pid_fd: int, key: str) -> str:
    try:
        with DirFd(pid_fd, key) as mdir:
            raw = read_small(mdir.fd, "dh", HELPER_SIZE)
    except OSError:
        return "?"
    if len(raw) != DOF_HELPER.size:
        return "?"
    name = raw[:64].split(b"\0", 1)[0]
    return name.decode("utf-8", "backslashreplace") or "?"


def find_unmapped(dofpid_fd: int, pid: int) -> tuple[list[Unmapped], Callable[[], bool]] | None:
    """The objects *pid* registered and no longer maps, with a re-check to call before removal.

    *dofpid_fd* is ``stash/dof-pid`` opened readable.  None when the process
    can't be looked at (gone, not the registered image, no stored identity):
    such a process is ``prune_dead``'s business, not this module's.  The
    returned callable re-checks the identity and every generation's target
    (step 3 of the module docstring); it is meant to be called right before
    the removals.
    """
    try:
        pdir = DirFd(dofpid_fd, str(pid), readable=True)
    except OSError:
        return None
    with pdir:
        ident = _stored_identity(pdir.fd)
        if ident is None:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        try:
            if not _is_registered_process(pid, pidfd, ident):
                return None
            gens = _generations(pdir.fd)  # before the maps: see the module docstring
            if not gens:
                return None
            try:
                space = AddressSpace.from_maps(read_proc(f"/proc/{pid}/maps"))
            except (OSError, ValueError):
                return None
            files = {(m.dev, m.ino) for m in space.mappings if m.file_backed}
            by_key: dict[str, list[int]] = {}
            for gen, key in sorted(gens.items()):
                by_key.setdefault(key, []).append(gen)
            found = [
                Unmapped(pid, key, tuple(g), _module(pdir.fd, key))
                for key, g in by_key.items()
                if not _object_mapped(space, files, pdir.fd, key)
            ]
            if not found:
                return None
            if not _is_registered_process(pid, pidfd, ident):
                return None  # it exited or exec()ed while we read: nothing is decided
        finally:
            os.close(pidfd)

    def still_valid() -> bool:
        """Re-read identity and generation targets just before the removals."""
        try:
            with DirFd(dofpid_fd, str(pid), readable=True) as again:
                if _stored_identity(again.fd) != ident:
                    return False
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    return False
                try:
                    if not _is_registered_process(pid, fd, ident):
                        return False
                finally:
                    os.close(fd)
                now = _generations(again.fd)
        except OSError:
            return False
        return all(now.get(gen) == u.key for u in found for gen in u.gens)

    return found, still_valid


def drop_unmapped(
    state_dir: str,
    writer: Remover,
    *,
    stopping: Callable[[], bool] = lambda: False,
    pids: Iterable[int] | None = None,
) -> list[Unmapped]:
    """Remove, for every live registered process, the generations of objects it unmapped.

    Returns what was removed.  *pids* limits the scan (default: every process
    in the stash).  Errors of one process are logged and the scan goes on;
    *stopping* is asked before each process.
    """
    dropped: list[Unmapped] = []
    try:
        root = DirFd(None, state_dir)
        stash = DirFd(root.fd, "stash")
        dofpid = DirFd(stash.fd, "dof-pid", readable=True)
    except OSError as err:
        log.debug("no stash to check for unmapped objects: %s", err)
        return dropped
    with root, stash, dofpid:
        if pids is None:
            pids = sorted(int(n) for n in os.listdir(dofpid.fd) if is_number(n))
        for pid in pids:
            if stopping():
                break
            try:
                result = find_unmapped(dofpid.fd, pid)
            except OSError as err:  # its directory went meanwhile (exit pruning)
                log.debug("%d: not checked for unmapped objects: %s", pid, err)
                continue
            if result is None:
                continue
            found, still_valid = result
            if not still_valid():
                log.debug("%d: changed while checked for unmapped objects; next prune", pid)
                continue
            dropped += _remove(writer, found)
    return dropped


def _remove(writer: Remover, found: list[Unmapped]) -> list[Unmapped]:
    done: list[Unmapped] = []
    for u in found:
        removed: list[int] = []
        try:
            for gen in u.gens:
                writer.remove(u.pid, gen)
                removed.append(gen)
        except DtprobedError as err:
            log.error(
                "%d: cannot drop generation %d of unmapped %s (%s): %s",
                u.pid,
                u.gens[len(removed)],
                u.module,
                u.key,
                err,
            )
            if removed:
                done.append(Unmapped(u.pid, u.key, tuple(removed), u.module))
            return done
        log.info(
            "%d: %s (%s) is no longer mapped: dropped generation%s %s",
            u.pid,
            u.module,
            u.key,
            "s" if len(u.gens) > 1 else "",
            " ".join(str(g) for g in u.gens),
        )
        done.append(u)
    return done


__all__ = ["Unmapped", "drop_unmapped", "find_unmapped"]
