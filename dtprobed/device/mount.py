"""Mounting the one-file FUSE filesystem on the helper path, in the host's mount namespace.

Facts we rely on:

* A systemd service with namespacing options (ProtectSystem=, PrivateTmp=, …)
  runs in its own mount namespace whose mounts are slaves of the host's: a
  mount made there never reaches the host (``MountFlags=shared`` does not
  change that, systemd.exec(5)).  So when our mount namespace differs from
  pid 1's, ``mount(2)`` and ``umount2(2)`` run in a short-lived forked child
  that first ``setns()``es into ``/proc/1/ns/mnt``.  The child inherits the
  already-open ``/dev/fuse`` fd, which is all ``fd=N`` in the options needs.
  It has to be a fresh single-threaded process: ``setns(CLONE_NEWNS)`` fails
  with EINVAL in a process that shares its fs state with other threads.  The
  child only makes syscalls (ctypes, ``os``) and leaves with ``os._exit``.
* Everything else (looking at the path, creating the placeholder file and
  missing directories, removing them) goes through ``/proc/1/root/…``: a path
  walk from that magic link continues in pid 1's mount tree, so no fork is
  needed for it.
* ``mount(2)`` refuses a file system whose root is a regular file on a
  directory and vice versa, so the root inode being a file means the mount
  point must be a (non-directory) file: we create an empty one if there is
  none, and never mount over a directory.
* A mount whose daemon died answers every request with ENOTCONN once the
  kernel aborted the connection (last ``/dev/fuse`` fd closed).  ``stat`` may
  still succeed from cached attributes, ``statfs`` always asks the daemon:
  ENOTCONN from ``statvfs`` means stale (detach it), success means a live
  daemon serves the path (refuse to start).  A daemon that is alive but hung
  would hang that ``statvfs`` too; we accept that.
* If pid 1's namespace cannot be inspected (``/proc/1/ns/mnt`` unreadable,
  e.g. under a sandbox that forbids ptrace-read of pid 1) we log a warning and
  mount in our own namespace.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from dtprobed.device.errors import DeviceBusy, DeviceError

CLONE_NEWNS: Final = 0x00020000
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MNT_DETACH: Final = 2
FUSE_FSTYPE: Final = b"fuse.dtprobed"  # shows as such in /proc/mounts
FUSE_SOURCE: Final = b"dtprobed"
_MAX_STALE_LAYERS: Final = 8

_libc = ctypes.CDLL(None, use_errno=True)
_mount = _libc.mount
_mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_umount2 = _libc.umount2
_umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_setns = _libc.setns
_setns.argtypes = (ctypes.c_int, ctypes.c_int)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


@dataclass(frozen=True)
class MountView:
    """The mount namespace the helper path lives in.

    ``ns_pid`` is None for our own namespace; otherwise paths are reached
    through ``root`` (``/proc/PID/root``) and (un)mounts run in a child that
    joined ``/proc/PID/ns/mnt``.
    """

    ns_pid: int | None = None

    @property
    def root(self) -> str:
        return "" if self.ns_pid is None else f"/proc/{self.ns_pid}/root"

    def at(self, path: str) -> str:
        return self.root + path

    def run(self, op: Callable[[], None]) -> None:
        """Run *op* (syscalls only) in this namespace; OSError carries its errno."""
        if self.ns_pid is None:
            op()
            return
        ns_fd = os.open(f"/proc/{self.ns_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                code = 0
                try:
                    _check(_setns(ns_fd, CLONE_NEWNS), "setns")
                    op()
                except OSError as err:
                    code = err.errno or 255
                except BaseException:
                    code = 255
                os._exit(code)
        finally:
            os.close(ns_fd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            errno = code if 0 < code < 255 else _errno.EIO
            raise OSError(errno, f"in mount namespace of pid {self.ns_pid}: {os.strerror(errno)}")


def host_view(host_ns_pid: int, log: logging.Logger) -> MountView:
    """Our own namespace if it is *host_ns_pid*'s, else a view into that one."""
    try:
        ours = os.stat("/proc/self/ns/mnt").st_ino
        theirs = os.stat(f"/proc/{host_ns_pid}/ns/mnt").st_ino
    except OSError as err:
        log.warning(
            "cannot compare mount namespaces with pid %d (%s): mounting in our own",
            host_ns_pid,
            err.strerror,
        )
        return MountView()
    if ours == theirs:
        return MountView()
    log.info("mounting in the mount namespace of pid %d (ours differs)", host_ns_pid)
    return MountView(host_ns_pid)


@dataclass
class MountPoint:
    """What :func:`prepare` created at the helper path, so :func:`cleanup` removes exactly that."""

    path: str
    view: MountView
    placeholder: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we created
    created_dirs: list[str] = field(default_factory=list)
    mounted: bool = False


def prepare(
    path: str, view: MountView, log: logging.Logger, *, create_missing: bool = True
) -> MountPoint:
    """Make *path* a mountable regular file; detach stale mounts; refuse a live one.

    With ``create_missing=False`` a missing path is left missing (CUSE mode
    only wants the path free of stale mounts).
    """
    point = MountPoint(path, view)
    full = view.at(path)
    for _ in range(_MAX_STALE_LAYERS):
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            if create_missing:
                _create_placeholder(point, log)
            return point
        except OSError as err:
            if err.errno != _errno.ENOTCONN:
                raise DeviceError(f"cannot stat {path}: {err.strerror}") from err
            _detach_stale(point, log)
            continue
        if _is_mount_point(full, st):
            try:
                os.statvfs(full)
            except OSError as err:
                if err.errno != _errno.ENOTCONN:
                    raise DeviceError(f"cannot statfs {path}: {err.strerror}") from err
                _detach_stale(point, log)
                continue
            raise DeviceBusy(f"{path} is already served by a running daemon (a mount is there)")
        if stat.S_ISCHR(st.st_mode):
            raise DeviceBusy(f"{path} is a character device (a CUSE dtprobed is running?)")
        if not stat.S_ISREG(st.st_mode):
            raise DeviceError(f"{path} exists and is not a regular file")
        return point
    raise DeviceError(f"{path}: more than {_MAX_STALE_LAYERS} stale mounts stacked")


def _is_mount_point(full: str, st: os.stat_result) -> bool:
    try:
        parent = os.stat(os.path.dirname(full))
    except OSError:
        return False
    return st.st_dev != parent.st_dev


def _detach_stale(point: MountPoint, log: logging.Logger) -> None:
    log.warning("%s: detaching a stale mount left by a daemon that died", point.path)
    target = os.fsencode(point.path)
    try:
        point.view.run(lambda: _check(_umount2(target, MNT_DETACH), "umount2"))
    except OSError as err:
        raise DeviceError(f"cannot detach stale mount on {point.path}: {err.strerror}") from err


def _create_placeholder(point: MountPoint, log: logging.Logger) -> None:
    missing: list[str] = []
    parent = os.path.dirname(point.path)
    while not os.path.lexists(point.view.at(parent)):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        for directory in reversed(missing):
            os.mkdir(point.view.at(directory), 0o755)
            point.created_dirs.append(directory)
        fd = os.open(
            point.view.at(point.path),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o666,
        )
        try:
            os.fchmod(fd, 0o666)  # not subject to the umask
            st = os.fstat(fd)
            point.placeholder = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)
    except OSError as err:
        cleanup(point, log)
        raise DeviceError(f"cannot create {point.path}: {err.strerror}") from err
    log.debug("created placeholder %s", point.path)


def mount_fuse(point: MountPoint, fuse_fd: int) -> None:
    """Mount the one-file FUSE filesystem served on *fuse_fd* over the placeholder.

    ``rootmode=100000``: the root inode is a regular file.  ``allow_other``:
    every user's process may reach it (the kernel otherwise limits a FUSE
    mount to its owner).  ``default_permissions``: the kernel checks the
    file's mode (0666) itself, so anyone may open it read-write and we never
    get ACCESS requests.
    """
    options = (
        f"fd={fuse_fd},rootmode=100000,user_id=0,group_id=0,allow_other,default_permissions"
    ).encode()
    target = os.fsencode(point.path)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        point.view.run(
            lambda: _check(_mount(FUSE_SOURCE, target, FUSE_FSTYPE, flags, options), "mount")
        )
    except OSError as err:
        raise DeviceError(f"cannot mount the FUSE helper on {point.path}: {err.strerror}") from err
    point.mounted = True


def unmount(point: MountPoint, log: logging.Logger) -> None:
    """Unmount (lazily if a client still holds the file open); never raises."""
    if not point.mounted:
        return
    target = os.fsencode(point.path)

    def op() -> None:
        if _umount2(target, 0) == 0:
            return
        if ctypes.get_errno() == _errno.EINVAL:  # not mounted (any more)
            return
        _check(_umount2(target, MNT_DETACH), "umount2(MNT_DETACH)")

    try:
        point.view.run(op)
    except OSError as err:
        log.error("cannot unmount %s: %s", point.path, err.strerror)
        return
    point.mounted = False


def cleanup(point: MountPoint, log: logging.Logger) -> None:
    """Remove the placeholder and directories we created (only if still ours); never raises."""
    if point.placeholder is not None:
        full = point.view.at(point.path)
        try:
            st = os.lstat(full)
            if (st.st_dev, st.st_ino) == point.placeholder and stat.S_ISREG(st.st_mode):
                os.unlink(full)
            point.placeholder = None
        except OSError as err:
            log.warning("cannot remove placeholder %s: %s", point.path, err.strerror)
    while point.created_dirs:
        directory = point.created_dirs.pop()
        try:
            os.rmdir(point.view.at(directory))
        except OSError as err:
            log.debug("left directory %s: %s", directory, err.strerror)
