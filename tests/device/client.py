"""A fake DTrace client: maps DOF from a file and registers it with the helper ioctl.

Run as ``python -m tests.device.client HELPER [--dof FILE] [--threads N]
[--dof-address ADDR] [--remove GEN]``.  Like drti: the DOF lives in a
file-backed mapping of this process, ``dof_helper_t`` points at it, and each
thread opens the helper path O_RDWR and calls ``ioctl``.  Prints one JSON line
per thread: ``{"tid": T, "result": R}`` or ``{"tid": T, "errno": E}``; before
the ioctls it prints ``{"pid": P}`` so a test can find (and kill) it.
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
from common.ioctl import DTRACEHIOC_ADDDOF, DTRACEHIOC_REMOVE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("helper")
    ap.add_argument("--dof")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dof-address", type=lambda s: int(s, 0))
    ap.add_argument("--remove", type=int)
    args = ap.parse_args()

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
    print(json.dumps({"pid": os.getpid()}), flush=True)

    def register() -> None:
        tid = threading.get_native_id()
        barrier.wait()
        fd = os.open(args.helper, os.O_RDWR | os.O_CLOEXEC)
        try:
            if args.remove is not None:
                out = {"tid": tid, "result": fcntl.ioctl(fd, DTRACEHIOC_REMOVE, args.remove)}
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
