"""The fetch helper: a child process that reads DOF out of a caller's memory.

Run by :class:`dtprobed.device.fetch.Fetcher` as ``python -I -m
dtprobed.device.fetchd``; never by hand.  Why a process: ``process_vm_readv``
of a page that lies in a file of a FUSE file system whose server withholds
the READ waits in the kernel (``request_wait_answer``, state D) until that
server answers or dies — SIGKILL does not end it (measured on this machine's
6.18 kernel, ``tests/device/test_fetch.py``).  A thread in that state can
neither be cancelled nor killed and would keep the daemon from exiting; a
child process in that state is simply abandoned by the daemon, which goes on
with a fresh one.

Protocol, on fd 0 (requests) and fd 1 (answers), little endian:

* request: ``<iQQQ`` = tid, address, max_size, stream_limit (32 bytes);
* answer: a sequence of chunks, each ``<q`` code then, if code ≥ 0, that many
  bytes.  The first chunk is the 64-byte DOF header; if its ``dofh_loadsz``
  is within ``[64, max_size]`` and ≤ ``stream_limit``, the rest of the DOF
  follows in chunks of at most :data:`CHUNK` bytes until ``loadsz`` bytes
  were sent.  A code < 0 is ``-errno`` and ends the answer (the read faulted:
  nothing more follows).  The daemon knows how much to expect from the header.

The helper holds at most one chunk at a time (1 MiB), so whatever a header
claims, it costs the bytes actually read.  It exits at EOF on fd 0.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from typing import Final

from common.dof_abi import DOF_HDR
from dtprobed.device.caller_memory import read_memory

REQUEST: Final = struct.Struct("<iQQQ")
CODE: Final = struct.Struct("<q")
HEADER_SIZE: Final = DOF_HDR.size
CHUNK: Final = 1 << 20


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve_one(tid: int, address: int, max_size: int, stream_limit: int, out: int) -> None:
    try:
        header = read_memory(tid, address, HEADER_SIZE)
    except OSError as err:
        _write_all(out, CODE.pack(-(err.errno or errno.EFAULT)))
        return
    first = CODE.pack(len(header)) + header
    loadsz = int(DOF_HDR.unpack_from(header).loadsz)
    if not HEADER_SIZE <= loadsz <= min(max_size, stream_limit):
        _write_all(out, first)
        return  # the daemon refuses it or fetches it again in the large lane
    if loadsz <= CHUNK:
        # one write for a DOF that fits one chunk (every small one): the daemon
        # wakes once, not once for the header and again for the rest
        try:
            rest = read_memory(tid, address + HEADER_SIZE, loadsz - HEADER_SIZE)
        except OSError as err:
            _write_all(out, first + CODE.pack(-(err.errno or errno.EFAULT)))
            return
        _write_all(out, first + CODE.pack(len(rest)) + rest if rest else first)
        return
    _write_all(out, first)
    done = HEADER_SIZE
    while done < loadsz:
        want = min(CHUNK, loadsz - done)
        try:
            chunk = read_memory(tid, address + done, want)
        except OSError as err:
            _write_all(out, CODE.pack(-(err.errno or errno.EFAULT)))
            return
        _write_all(out, CODE.pack(len(chunk)) + chunk)
        done += want


def main() -> int:
    inp, out = 0, 1
    sys.stdout = sys.stderr  # nothing but answers on fd 1
    while True:
        raw = _read_exact(inp, REQUEST.size)
        if raw is None:
            return 0
        tid, address, max_size, stream_limit = REQUEST.unpack(raw)
        serve_one(int(tid), int(address), int(max_size), int(stream_limit), out)


if __name__ == "__main__":
    os._exit(main())
