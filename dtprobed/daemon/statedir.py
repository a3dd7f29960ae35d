"""The state directory's file system: a warning, once at start-up, when it is not in memory.

Upstream assumes ``/run`` is a tmpfs, as it is under systemd.  In containers
and chroots it often is not: on an ext4 ``/run`` every stash file (a
per-probe file and its ``probes/`` hard link) costs a journalled metadata
update, about 25 times what it costs on tmpfs, and a 2000-probe registration
takes seconds instead of a tenth of one.  The daemon works either way; it
says so once, with the cost it measured there, and what to do about it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import tempfile
import time
from typing import Final

TMPFS_MAGIC: Final = 0x01021994
RAMFS_MAGIC: Final = 0x858458F6
IN_MEMORY: Final = frozenset({TMPFS_MAGIC, RAMFS_MAGIC})

#: statfs(2) f_type values worth naming in the message (linux/magic.h).
FS_NAMES: Final = {
    TMPFS_MAGIC: "tmpfs",
    RAMFS_MAGIC: "ramfs",
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x794C7630: "overlayfs",
    0xF2F52010: "f2fs",
    0x2FC12FC1: "zfs",
    0x6969: "nfs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x01021997: "9p",
}

#: The registration size the message puts the cost in terms of.
EXAMPLE_PROBES: Final = 2000
#: How many files the measurement writes, and how long it may take at most.
SAMPLE_FILES: Final = 200
SAMPLE_BUDGET: Final = 0.25
#: A per-probe file of a probe with one tracepoint and no arguments (docs/stash.md).
SAMPLE_BYTES: Final = b"\0" * 143


class _Statfs(ctypes.Structure):
    # struct statfs of glibc on 64-bit Linux; only f_type is read.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_statfs = _libc.statfs
_statfs.argtypes = (ctypes.c_char_p, ctypes.POINTER(_Statfs))
_statfs.restype = ctypes.c_int


def fs_type(path: str) -> int:
    """statfs(2) f_type of the file system holding *path* (unsigned)."""
    buf = _Statfs()
    if _statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(buf.f_type) & 0xFFFFFFFF


def fs_name(magic: int) -> str:
    return FS_NAMES.get(magic, f"f_type {magic:#x}")


def file_cost(directory: str) -> float:
    """Seconds one stash file costs in *directory*, written the way the stash writer does.

    An ``O_TMPFILE`` written complete, linked into place through
    ``/proc/self/fd``, then hard-linked once more (its ``probes/`` name).
    Measured in a private temporary directory inside *directory* (so on the
    same file system), removed afterwards.
    """
    scratch = tempfile.mkdtemp(prefix=".dtprobed-fs-cost.", dir=directory)
    dir_fd = os.open(scratch, os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        done = 0
        start = time.perf_counter()
        while done < SAMPLE_FILES:
            name = str(done)
            fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
            try:
                os.write(fd, SAMPLE_BYTES)
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
            finally:
                os.close(fd)
            os.link(name, name + ".link", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            done += 1
            if time.perf_counter() - start > SAMPLE_BUDGET:
                break
        return (time.perf_counter() - start) / done
    finally:
        os.close(dir_fd)
        shutil.rmtree(scratch, ignore_errors=True)


def warn_if_not_in_memory(state_dir: str, log: logging.Logger) -> bool:
    """Log one WARNING when *state_dir* is on neither tmpfs nor ramfs; True if it did."""
    try:
        magic = fs_type(state_dir)
    except OSError as err:
        log.debug("cannot statfs %s: %s", state_dir, err.strerror)
        return False
    if magic in IN_MEMORY:
        return False
    try:
        seconds = file_cost(state_dir)
    except OSError as err:
        cost = total = f"(not measured: {err.strerror})"
    else:
        cost = f"~{seconds * 1e3:.2f} ms"
        total = f"~{seconds * EXAMPLE_PROBES:.1f} s"
    log.warning(
        "state directory %s is on %s, not tmpfs: each stash file costs %s here "
        "(on tmpfs ~0.01-0.02 ms), so a %d-probe registration spends at least %s "
        "writing the stash. "
        "Mount a tmpfs on it before starting dtprobed "
        "(mount -t tmpfs -o mode=0755 dtprobed %s; packaging/install.sh does so "
        "where systemd is not pid 1; see docs/operations.md) or start dtprobed with "
        "-s on a tmpfs",
        state_dir,
        fs_name(magic),
        cost,
        EXAMPLE_PROBES,
        total,
        state_dir,
    )
    return True
