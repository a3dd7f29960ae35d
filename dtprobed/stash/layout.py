"""The DOF stash: the daemon's only state, and its contract with the ``dtrace`` consumer.

Why: ``dtrace`` finds USDT probes of running processes by globbing files
under the state directory (default ``/run/dtrace``); the daemon needs the raw
DOF again to reparse after an upgrade and to remove a process's probes when
it exits, execs or sends DTRACEHIOC_REMOVE.  The layout and the bytes are
upstream's newest (``DOF_PARSED_VERSION 3``, raw files with the 8-byte base
prefix), so the real consumer reads this stash and upstream's dtprobed and
ours can take over each other's state directory.

Layout (``$dev`` is glibc ``makedev`` encoding, ``$dev-$ino`` is ``%ju-%ju``;
``$dev-$ino`` = ``0-<dofhp_dof>`` for DOF in anonymous memory)::

  stash/dof/$dev-$ino
      raw block 0: u64 base + bytes.  DOF (ADDDOF): base 0 + the DOF.  ELF
      notes (HASUSDT): base ``sh_addr(.note.usdt)`` + the whole section.
      Shared, by hard link, among registrations of the same mapping whose
      bytes are *identical*; unlinked when its link count drops to 1.  Never
      for anonymous DOF.
  stash/dof/$dev-$ino-1
      raw block 1, notes only: u64 ``sh_addr(.rodata)`` + the whole
      ``.rodata`` (the function names the notes point at).  Shared like block 0.
  stash/dof-pid/$pid/
      one directory per registered process; xattrs
      ``trusted.dtprobed.start_time`` (decimal clock ticks, /proc/PID/stat
      field 22) and ``trusted.dtprobed.exec_token`` keep our extra identity
      state out of upstream's file layout.  Removed with its last generation.
  stash/dof-pid/$pid/next-gen
      sparse file; its size is the next generation number (generations
      start at 0 when the directory is created).
  stash/dof-pid/$pid/exec-mapping
      ``"$dev-$ino"`` of the main executable, no trailing NUL (what the 2.0.7
      release writes, measured); differs → the process exec'd.  Read with or
      without one trailing NUL (upstream's development tree adds it; the
      consumer and ``verify`` accept both); a NUL anywhere else is invalid.
  stash/dof-pid/$pid/$gen -> $dev-$ino
      relative symlink, one per ADDDOF.  **The commit point**: a mapping
      directory that no generation points at is an interrupted operation and
      is rolled back at start-up.  Several generations may point at one
      mapping (the same mapping registered twice); the directory goes with
      the last of them.
  stash/dof-pid/$pid/$dev-$ino/raw, .../raw-1
      hard link to stash/dof/$dev-$ino (-1) (link count > 1), or — when this
      registration's bytes differ from the shared file, or the DOF is
      anonymous — a private file of the same format (link count 1).  raw-1
      exists exactly for notes registrations.
  stash/dof-pid/$pid/$dev-$ino/dh
      the 80-byte ``dof_helper_t``: as received (ADDDOF), or as upstream
      builds it for notes: the object's basename NUL-padded (upstream leaves
      stack garbage after the NUL; we write zeros), ``dofhp_addr`` the load
      base (first mapping for ET_DYN, 0 for ET_EXEC), ``dofhp_dof`` 0.
  stash/dof-pid/$pid/$dev-$ino/parsed/version
      u64 ``DOF_PARSED_VERSION``; written *last*, so a mapping without it
      has no (or partial) parsed files and is reparsed at start-up.
  stash/dof-pid/$pid/$dev-$ino/parsed/$prv:$mod:$fun:$prb
      one per probe (provider name without pid): u64 version, PROVIDER,
      PROBE, [ARGS_NATIVE [ARGS_XLAT ARGS_MAP]], ntp × TRACEPOINT in the C
      layout of :mod:`common.stash_format`.  Created as an ``O_TMPFILE`` and
      linked into place complete, so no half-written file is ever visible.
  probes/$pid/$prv$pid/$mod/$fun/$prb
      hard link to one parsed file of that process (the first mapping that
      provided the probe; on its removal another mapping's file takes over).

Directories are 0755 and files 0644 whatever the umask.  Only the stash
writer process changes this tree; it takes no lock in it (any lock in a
world-readable tree is one any user can hold against the writer).  One writer
per state directory is enforced by a lock file in a 0700 directory of its own
(:func:`dtprobed.stash.store.writer_lock`).  Readers (``dtprobed-stash``, the
consumer) take no lock and tolerate a tree that changes under them.

Version word: ``DOF_PARSED_VERSION`` (:mod:`common.stash_format`) changes only
together with upstream's; every parsed file and ``parsed/version`` carry it,
and mappings whose ``parsed/version`` differs are reparsed at start-up.

Facts we rely on:

* ``open(dir, O_TMPFILE)`` then ``linkat("/proc/self/fd/N", …,
  AT_SYMLINK_FOLLOW)`` gives a file a name only when it is complete (tmpfs
  and ext4 support O_TMPFILE; the writer runs as root with /proc mounted).
* ``link()`` and ``symlink()`` never replace an existing name (``EEXIST``),
  so they are our ``O_EXCL`` for names.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import Final

from common.dof_abi import DOF_HELPER
from common.names import NameRefused, check_probespec
from dtprobed.oslib.fdio import read_exactly

DIR_MODE: Final = 0o755
FILE_MODE: Final = 0o644
RAW_PREFIX: Final = bytes(8)  # u64 base = 0: block 0 of a DOF registration
HELPER_SIZE: Final = DOF_HELPER.size
XATTR_START_TIME: Final = "trusted.dtprobed.start_time"
XATTR_EXEC_TOKEN: Final = "trusted.dtprobed.exec_token"
#: The registering caller's real uid (decimal), for the per-uid quotas.
XATTR_UID: Final = "trusted.dtprobed.uid"
#: Generations that catch-up registered on the process's behalf (decimal, space-separated;
#: a number whose symlink is gone means nothing: generations are never reused).
XATTR_CAUGHT_UP: Final = "trusted.dtprobed.caught_up"
#: Longest caught-up list kept (a process with more objects than fit is not marked further).
MAX_CAUGHT_UP_XATTR: Final = 4096
MAX_EXEC_MAPPING: Final = 64

_KEY_RE: Final = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_NUM_RE: Final = re.compile(r"0|[1-9][0-9]{0,9}")
_OPEN_FILE: Final = os.O_CLOEXEC | os.O_NOFOLLOW

#: Every name the tree may hold, relative to the state directory: the same
#: patterns as the docstring, used by ``verify`` to find what is not ours.
LAYOUT: Final[tuple[tuple[str, str, str], ...]] = (
    ("stash", "dir", "private to the daemon"),
    ("stash/dof", "dir", "shared raw blocks"),
    ("stash/dof/$dev-$ino", "file", "u64 base + DOF or .note.usdt; hard-linked"),
    ("stash/dof/$dev-$ino-1", "file", "u64 base + .rodata (notes); hard-linked"),
    ("stash/dof-pid", "dir", "per-process state"),
    ("stash/dof-pid/$pid", "dir", "one process; xattrs start_time, exec_token"),
    ("stash/dof-pid/$pid/next-gen", "file", "sparse; size = next generation"),
    ("stash/dof-pid/$pid/exec-mapping", "file", '"$dev-$ino" (read: optional trailing NUL)'),
    ("stash/dof-pid/$pid/$gen", "symlink", "-> $dev-$ino; the commit point"),
    ("stash/dof-pid/$pid/$dev-$ino", "dir", "one mapping"),
    ("stash/dof-pid/$pid/$dev-$ino/raw", "file", "link to stash/dof/$dev-$ino or private"),
    ("stash/dof-pid/$pid/$dev-$ino/raw-1", "file", "notes: link to stash/dof/$dev-$ino-1"),
    ("stash/dof-pid/$pid/$dev-$ino/dh", "file", "80-byte dof_helper_t"),
    ("stash/dof-pid/$pid/$dev-$ino/parsed", "dir", "parsed records"),
    ("stash/dof-pid/$pid/$dev-$ino/parsed/version", "file", "u64 DOF_PARSED_VERSION"),
    ("stash/dof-pid/$pid/$dev-$ino/parsed/$prv:$mod:$fun:$prb", "file", "one probe"),
    ("probes", "dir", "what the consumer globs"),
    ("probes/$pid/$prv$pid/$mod/$fun/$prb", "file", "link to a parsed file"),
)


def mapping_key(dev: int, ino: int) -> str:
    return f"{dev}-{ino}"


#: Raw blocks a registration has at most (DOF: 1; ELF notes: 2).
MAX_RAW_BLOCKS: Final = 2


def raw_name(index: int) -> str:
    """The mapping directory's file of raw block *index*: ``raw``, ``raw-1``."""
    return "raw" if index == 0 else f"raw-{index}"


def shared_raw_name(key: str, index: int) -> str:
    """The shared file of raw block *index* in ``stash/dof``: ``$dev-$ino``, ``$dev-$ino-1``."""
    return key if index == 0 else f"{key}-{index}"


def split_shared_raw_name(name: str) -> tuple[str, int] | None:
    """``stash/dof`` entry → (mapping key, block index), or None when it is not one."""
    if split_key(name) is not None:
        return name, 0
    key, dash, index = name.rpartition("-")
    if dash and index.isdigit() and 0 < int(index) < MAX_RAW_BLOCKS and split_key(key):
        return key, int(index)
    return None


def exec_mapping_bytes(exec_dev: int, exec_ino: int) -> bytes:
    """The bytes of ``exec-mapping`` as the 2.0.7 daemon writes them: no trailing NUL."""
    return mapping_key(exec_dev, exec_ino).encode("ascii")


def parse_exec_mapping(data: bytes) -> str | None:
    """``$dev-$ino`` from an ``exec-mapping`` with or without one trailing NUL; None if invalid."""
    if data.endswith(b"\0"):
        data = data[:-1]
    try:
        text = data.decode("ascii")
    except UnicodeError:
        return None
    return text if split_key(text) is not None else None


def split_key(name: str) -> tuple[int, int] | None:
    """Upstream's strict ``split_dof_name``: two unsigned decimals joined by '-'."""
    if not _KEY_RE.fullmatch(name):
        return None
    dev, ino = (int(x) for x in name.split("-"))
    if dev >= 1 << 64 or ino >= 1 << 64:
        return None
    return dev, ino


def is_number(name: str) -> bool:
    return _NUM_RE.fullmatch(name) is not None


def parse_caught_up(value: bytes) -> set[int]:
    """The generations in a ``trusted.dtprobed.caught_up`` value (malformed words ignored)."""
    words = value.decode("ascii", "replace").split()
    return {int(w) for w in words if is_number(w)}


def split_spec(name: str) -> tuple[str, str, str, str] | None:
    """``prv:mod:fun:prb`` → its parts, or None when the name breaks the policy."""
    parts = name.split(":")
    if len(parts) != 4:
        return None
    prv, mod, fun, prb = parts
    try:
        check_probespec(prv, mod, fun, prb)
    except NameRefused:
        return None
    return prv, mod, fun, prb


def read_small(dir_fd: int, name: str, limit: int) -> bytes:
    """Read a regular file of at most *limit* bytes; anything else is refused, not followed."""
    fd = os.open(name, os.O_RDONLY | _OPEN_FILE | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{name} is not a regular file")
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"{name} is {st.st_size} bytes, more than {limit}")
        return read_exactly(fd, st.st_size)
    finally:
        os.close(fd)
