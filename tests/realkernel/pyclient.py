"""The Python twin of client.c: registers DOF through ``fcntl.ioctl``, same commands, same answers.

Run it as a script (``python -S pyclient.py DEVICE DOF-FILE [COMMAND...]``; only the
standard library, so ``-S`` keeps start-up short under emulation).  Like client.c it
builds an object in a memfd: ``TEXT_SIZE`` bytes of text, mapped ``PROT_READ|PROT_EXEC``,
then the DOF file's bytes, mapped read-only and private from the same memfd, ``loadsz``
bytes long (or the file size if larger), as a shared library holds its probe sites and
its DOF.

The tests' DOF puts its tracepoints at 0x401000 and up (with SETX relocations), so
``dofhp_addr`` is the text's address minus 0x401000: the parser adds ``dofhp_addr`` to
every probe address not above it (reference §2.5, relocation rule), which moves the
tracepoints into that text, as the load base of a shared object would.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
import sys
import time

DTRACEHIOC_REMOVE = 0x4004D802
DTRACEHIOC_ADDDOF = 0x4050D803
TRACEPOINT_BASE = 0x401000


TEXT_SIZE = 512 << 10  # tracepoint offsets stay below 512 KiB


def libc_mmap(length: int, prot: int, fd: int, offset: int) -> int:
    """mmap(NULL, length, prot, MAP_PRIVATE, fd, offset); mapped for the process's life."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    addr = libc.mmap(None, length, prot, mmap.MAP_PRIVATE, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise SystemExit(f"mmap failed: {os.strerror(ctypes.get_errno())}")
    return int(addr)


class Client:
    def __init__(self, device: str, dof_path: str) -> None:
        self.device = device
        self.fd = -1
        with open(dof_path, "rb") as f:
            data = f.read()
        loadsz = struct.unpack_from("<Q", data, 40)[0] if len(data) >= 48 else 0
        obj = os.memfd_create("dtprobed-test-object", os.MFD_CLOEXEC)
        try:
            os.write(obj, b"\x90" * TEXT_SIZE)
            os.pwrite(obj, data, TEXT_SIZE)
            text = libc_mmap(TEXT_SIZE, mmap.PROT_READ | mmap.PROT_EXEC, obj, 0)
            # libc's mmap, not the mmap module: the mapping may reach beyond the end of
            # the file (a truncated DOF), which the mmap module refuses.
            self.dof_addr = libc_mmap(max(len(data), loadsz, 1), mmap.PROT_READ, obj, TEXT_SIZE)
        finally:
            os.close(obj)
        self.base = text - TRACEPOINT_BASE

    def helper(self, mod: str) -> bytes:
        return struct.pack("<64sQQ", mod.encode()[:63], self.base, self.dof_addr)

    def run(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        cmd, arg = words[0], (words[1] if len(words) > 1 else None)
        if cmd == "open":
            try:
                self.fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
                answer = "open OK"
            except OSError as err:
                answer = f"open ERR {err.errno}"
        elif cmd == "add":
            answer = "add {} {}".format(
                *self.ioctl(DTRACEHIOC_ADDDOF, self.helper(arg or "pyclient"))
            )
        elif cmd == "remove":
            # The generation travels in the argument itself (an int), not behind a pointer.
            answer = "remove {} {}".format(*self.ioctl(DTRACEHIOC_REMOVE, int(arg or "0", 0)))
        elif cmd == "bench":
            times = []
            for _ in range(int(arg or "1")):
                t0 = time.monotonic_ns()
                rc, code = self.ioctl(DTRACEHIOC_ADDDOF, self.helper("pyclient"))
                if rc < 0:
                    times.append(f"ERR{code}")
                    break
                times.append(str(time.monotonic_ns() - t0))
            answer = " ".join(["bench", *times])
        elif cmd == "close":
            os.close(self.fd)
            self.fd = -1
            answer = "close OK"
        elif cmd == "pid":
            answer = f"pid {os.getpid()}"
        elif cmd == "exit":
            sys.stdout.flush()
            os._exit(int(arg or "0"))
        elif cmd == "stdin":
            for more in sys.stdin:
                self.run(more)
            return
        else:
            answer = f"unknown {cmd}"
        print(answer, flush=True)

    def ioctl(self, request: int, arg: bytes | int) -> tuple[int, int]:
        """(result, 0) or (-1, errno), as the C client prints them."""
        try:
            if isinstance(arg, int):
                # An int argument is passed by value: what REMOVE needs.
                return fcntl.ioctl(self.fd, request, arg), 0
            # A mutable buffer makes fcntl.ioctl return the ioctl's result (the
            # generation) instead of the buffer; the kernel reads the 80 bytes from it.
            return fcntl.ioctl(self.fd, request, bytearray(arg), True), 0
        except OSError as err:
            return -1, err.errno or errno.EIO


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} DEVICE DOF-FILE [COMMAND...]")
    client = Client(sys.argv[1], sys.argv[2])
    for command in sys.argv[3:]:
        client.run(command)


if __name__ == "__main__":
    main()
