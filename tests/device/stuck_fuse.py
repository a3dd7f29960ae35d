"""A hostile FUSE file system for tests: one file whose READ is never answered.

Run as ``python -m tests.device.stuck_fuse MOUNTPOINT [--size N] [--readahead N]
[--withhold-getattr]``.
It mounts a one-file FUSE file system on MOUNTPOINT (an existing regular file:
the root inode is a regular file, as in the daemon's own helper mount), of
*size* bytes, mode 0444, answers INIT, GETATTR, OPEN, FLUSH, RELEASE and
INTERRUPT-free everything else with ENOSYS — and never answers READ (nor, with
``--withhold-getattr``, GETATTR: then even a ``stat`` of the file waits).  A
process that maps the file and touches a page (or whose page another process
touches through ``process_vm_readv``) waits in the kernel until this server
answers or goes away.

It prints one JSON line per event on stdout: ``{"mounted": true}`` once INIT
is answered, ``{"read": offset, "size": n}`` for each READ it withholds, ``{"getattr": n}`` for
each withheld GETATTR.  It
exits when stdin closes (the test ends it), unmounting first: every withheld
READ then fails (the kernel aborts the connection when /dev/fuse is closed).

It speaks the kernel protocol with the daemon's codec
(:mod:`dtprobed.device.fuse_proto`), so it needs nothing but root.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import os
import select
import sys
import time

from common import fuse_abi as abi
from dtprobed.device import fuse_proto as proto

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
READ_BUFFER = 1 << 20


def _say(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _attr_reply(unique: int, size: int) -> bytes:
    now = int(time.time())
    mode = abi.S_IFREG | 0o444
    attr = (1, size, (size + 511) // 512, now, now, now, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)
    return proto.encode_reply(unique, abi.FUSE_ATTR_OUT.pack(3600, 0, *attr))


def serve(mountpoint: str, size: int, readahead: int, withhold_getattr: bool) -> None:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={fd},rootmode=100000,user_id=0,group_id=0,allow_other".encode()
    if _libc.mount(b"stuckfs", mountpoint.encode(), b"fuse.stuck", MS_NOSUID | MS_NODEV, options):
        err = ctypes.get_errno()
        raise OSError(err, f"mount {mountpoint}: {os.strerror(err)}")
    buf = bytearray(READ_BUFFER)
    withheld: list[int] = []
    try:
        while True:
            ready, _, _ = select.select([fd, sys.stdin], [], [])
            if sys.stdin in ready and not os.read(sys.stdin.fileno(), 4096):
                break
            if fd not in ready:
                continue
            try:
                n = os.readv(fd, [buf])
            except OSError as err:
                if err.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue
                if err.errno == errno.ENODEV:
                    break
                raise
            req = proto.decode_request(memoryview(buf)[:n])
            op = req.opcode
            if op == abi.FUSE_INIT:
                minor = min(int(req.args.minor), abi.FUSE_KERNEL_MINOR_VERSION)
                os.write(
                    fd,
                    proto.encode_init(
                        req.unique, minor=minor, max_readahead=readahead, max_write=4096
                    ),
                )
                _say({"mounted": True})
            elif op == abi.FUSE_GETATTR and withhold_getattr:
                withheld.append(req.unique)  # never answered
                _say({"getattr": len(withheld)})
            elif op == abi.FUSE_GETATTR:
                os.write(fd, _attr_reply(req.unique, size))
            elif op == abi.FUSE_OPEN:
                os.write(fd, proto.encode_open(req.unique, fh=1, open_flags=0))
            elif op in (abi.FUSE_FLUSH, abi.FUSE_RELEASE):
                os.write(fd, proto.encode_reply(req.unique))
            elif op == abi.FUSE_READ:
                withheld.append(req.unique)  # never answered
                offset = int.from_bytes(req.payload[8:16], "little") if req.args is None else -1
                _say({"read": offset, "withheld": len(withheld)})
            elif op in abi.NO_REPLY_OPCODES or op == abi.FUSE_INTERRUPT:
                pass
            else:
                os.write(fd, proto.encode_error(req.unique, errno.ENOSYS))
    finally:
        _libc.umount2(mountpoint.encode(), MNT_DETACH)
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mountpoint")
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--readahead", type=int, default=0, help="max_readahead in INIT")
    ap.add_argument("--withhold-getattr", action="store_true")
    args = ap.parse_args()
    serve(args.mountpoint, args.size, args.readahead, args.withhold_getattr)


if __name__ == "__main__":
    main()
