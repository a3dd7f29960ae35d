"""The read-exactly / read-all / write-all loops over raw file descriptors."""

from __future__ import annotations

import errno
import os
from typing import Final

#: Most reads are of a small /proc file or frame: a 64 KiB buffer comes from the heap
#: and goes back to it, where a 1 MiB one cost an mmap and a munmap (or, in the daemon,
#: whose mmap threshold is fixed higher, two brk calls) per read.
_CHUNK: Final = 64 << 10


def read_exactly(fd: int, n: int) -> bytes:
    """*n* bytes, or fewer only when the peer closed the pipe or the file ended."""
    chunks: list[bytes] = []
    while n > 0:
        chunk = os.read(fd, min(n, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_all(fd: int, limit: int, *, what: str = "file") -> bytes:
    """Everything up to end of file; ``EFBIG`` when there is more than *limit* bytes."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise OSError(errno.EFBIG, f"{what} larger than {limit} bytes")
        chunks.append(chunk)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte (blocking fds: a pipe, a file)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
