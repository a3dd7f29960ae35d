"""A fake DTrace client: maps DOF from a file and registers it with the helper ioctl.

Run as ``python -m tests.device.client HELPER [--dof FILE] [--threads N]
[--dof-address ADDR] [--remove GEN] [--hasusdt [ADDR] [--cmd N]]``.  Like drti: the DOF lives in a
file-backed mapping of this process, ``dof_helper_t`` points at it, and each
thread opens the helper path O_RDWR and calls ``ioctl``.  Prints one JSON line
per thread: ``{"tid": T, "result": R}`` or ``{"tid": T, "errno": E}``; before
the ioctls it prints ``{"pid": P}`` so a test can find (and kill) it.

``--hasusdt`` issues ``DTRACEHIOC_HASUSDT`` (or ``--cmd``) as dtrace ≥ 2.0.3's
drti does, the address *by value* — by default that of a function (libc's
``getpid``: readable code in a file mapping), printed as
``{"pid": P, "address": A, "code": HEX}`` with the first 8 bytes there.
``fcntl.ioctl`` passes an int argument as a C ``int``, so this goes through
ctypes to pass a 64-bit pointer.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import mmap
import os
import sys
import threading

from common.dof_build import build_helper
from common.ioctl import DTRACEHIOC_ADDDOF, DTRACEHIOC_HASUSDT, DTRACEHIOC_REMOVE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def ioctl_by_value(fd: int, cmd: int, value: int) -> int:
    """``ioctl(fd, cmd, (void *)value)``; raises OSError like ``fcntl.ioctl``."""
    result = _libc.ioctl(fd, cmd, value)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("helper")
    ap.add_argument("--dof")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dof-address", type=lambda s: int(s, 0))
    ap.add_argument("--remove", type=int)
    ap.add_argument("--hasusdt", nargs="?", const="function", default=None)
    ap.add_argument("--cmd", type=lambda s: int(s, 0), default=DTRACEHIOC_HASUSDT)
    args = ap.parse_args()
    usdt_address = 0
    if args.hasusdt == "function":
        usdt_address = ctypes.cast(_libc.getpid, ctypes.c_void_p).value or 0
    elif args.hasusdt is not None:
        usdt_address = int(args.hasusdt, 0)

    address = args.dof_address
    keep: list[object] = []
    if args.dof is not None:
        with open(args.dof, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # file-backed, private
        keep.append(mapping)
        if address is None:
            address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    helper = build_helper(b"client", 0, address or 0)
    lock = threading.Lock()
    barrier = threading.Barrier(args.threads)
    hello: dict[str, object] = {"pid": os.getpid()}
    if args.hasusdt == "function":
        hello["address"] = usdt_address
        hello["code"] = ctypes.string_at(usdt_address, 8).hex()
    print(json.dumps(hello), flush=True)

    def register() -> None:
        tid = threading.get_native_id()
        barrier.wait()
        fd = os.open(args.helper, os.O_RDWR | os.O_CLOEXEC)
        try:
            if args.remove is not None:
                out = {"tid": tid, "result": fcntl.ioctl(fd, DTRACEHIOC_REMOVE, args.remove)}
            elif args.hasusdt is not None:
                out = {"tid": tid, "result": ioctl_by_value(fd, args.cmd, usdt_address)}
            else:
                buf = bytearray(helper)
                out = {"tid": tid, "result": fcntl.ioctl(fd, DTRACEHIOC_ADDDOF, buf, True)}
        except OSError as err:
            out = {"tid": tid, "errno": err.errno}
        finally:
            os.close(fd)
        with lock:
            print(json.dumps(out), flush=True)

    threads = [threading.Thread(target=register) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
