"""One mapping of a process, looked up by address in the kernel (``PROCMAP_QUERY``).

Reading ``/proc/PID/maps`` makes the kernel format every mapping of the
process and us parse the text; a registration looks up two or three of them.
Linux 6.11 added the ``PROCMAP_QUERY`` ioctl on an open ``/proc/PID/maps``:
it answers the mapping that covers one address, with the fields of its maps
line, under the same access check as reading the file (made at its open).
For a process with 200 mappings that is ~1.3 µs instead of ~180 µs
(``bench/profile_registration.py``, docs/performance.md).

The ABI (``include/uapi/linux/fs.h``): ``struct procmap_query``, 104 bytes,
``_IOWR('f', 17, ...)`` = ``0xC0686611``; nine ``__u64`` (size, query_flags,
query_addr, then out: vma_start, vma_end, vma_flags, vma_page_size,
vma_offset, inode), four ``__u32`` (dev_major, dev_minor, vma_name_size
in/out, build_id_size in/out), two ``__u64`` (vma_name_addr, build_id_addr).
``query_flags`` 0 asks for the mapping that covers ``query_addr`` exactly:
``ENOENT`` when there is none.  The name is what the maps line shows (the
path, `` (deleted)`` appended for an unlinked file, or ``[heap]`` and the
like), except that the maps text escapes a newline as ``\\012``: the name is
escaped the same way here, so both sources give the same path.

A kernel without the ioctl answers ``ENOTTY``; :meth:`MapsQuery.open` then
returns None and the caller reads the text.  The ``vsyscall`` page is no
mapping of the process's (the text lists it, the ioctl does not): nothing of
ours looks up an address there.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from typing import Final

PROCMAP_QUERY: Final = 0xC0686611
_QUERY: Final = struct.Struct("<9Q4I2Q")
assert _QUERY.size == 104

VMA_READABLE: Final = 0x01
VMA_WRITABLE: Final = 0x02
VMA_EXECUTABLE: Final = 0x04
VMA_SHARED: Final = 0x08

#: PATH_MAX, the `` (deleted)`` suffix and the terminating NUL fit.
_NAME_BUFFER: Final = 4096 + 64
#: Errors of the first query that mean "this kernel has no PROCMAP_QUERY".
_UNSUPPORTED: Final = (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP)

_supported: bool | None = None  # learnt from the first query; None: not yet known


@dataclass(frozen=True, slots=True)
class Vma:
    """One mapping, with the fields of its ``/proc/PID/maps`` line."""

    start: int
    end: int
    perms: str  # "r-xp", as the maps line writes it
    offset: int
    major: int
    minor: int
    inode: int
    name: str  # path (``\\n`` escaped as ``\\012``), ``[heap]``…, or ""


def _perms(flags: int) -> str:
    return (
        ("r" if flags & VMA_READABLE else "-")
        + ("w" if flags & VMA_WRITABLE else "-")
        + ("x" if flags & VMA_EXECUTABLE else "-")
        + ("s" if flags & VMA_SHARED else "p")
    )


class MapsQuery:
    """An open ``/proc/PID/maps`` answering lookups by address.  Owns its fd until :meth:`close`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._name = ctypes.create_string_buffer(_NAME_BUFFER)
        self._buf = bytearray(_QUERY.size)

    @classmethod
    def open(cls, pid: int) -> MapsQuery | None:
        """A query on *pid*'s mappings; None when the kernel lacks ``PROCMAP_QUERY``.

        ``OSError`` when ``/proc/PID/maps`` can't be opened (the process is gone).
        """
        global _supported
        if _supported is False:
            return None
        fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        query = cls(fd)
        if _supported is None:
            try:
                query.at(0)  # page 0 is never mapped: ENOENT where the ioctl exists
            except OSError as err:
                if err.errno not in _UNSUPPORTED:
                    query.close()
                    raise
                _supported = False
                query.close()
                return None
            _supported = True
        return query

    @property
    def fd(self) -> int:
        return self._fd

    def at(self, addr: int) -> Vma | None:
        """The mapping that covers *addr*; None when nothing does.  ``OSError`` otherwise."""
        if not 0 <= addr < 1 << 64:
            return None
        buf = self._buf
        _QUERY.pack_into(
            buf, 0, _QUERY.size, 0, addr, 0, 0, 0, 0, 0, 0, 0, 0, _NAME_BUFFER, 0,
            ctypes.addressof(self._name), 0,
        )  # fmt: skip
        try:
            fcntl.ioctl(self._fd, PROCMAP_QUERY, buf, True)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return None
            raise
        (_, _, _, start, end, flags, _, offset, inode, major, minor, name_size, _, _, _) = (
            _QUERY.unpack(buf)
        )
        name = b""
        if name_size:
            name = ctypes.string_at(self._name, min(name_size, _NAME_BUFFER) - 1)
        text = name.decode("utf-8", "surrogateescape").replace("\n", "\\012")
        return Vma(int(start), int(end), _perms(flags), offset, major, minor, inode, text)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
