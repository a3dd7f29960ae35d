"""Run one action in a process locked exactly as the parser child locks itself.

    python -m tests.sandbox.locked_child ACTION

Used by ``test_sandbox.py``: the parent asserts a clean exit (exit status 0,
the action's output on stdout) for the allowed workload, or death by SIGSYS for
each forbidden action.  Everything an action needs is imported and prepared
*before* the lock, as in the real child.
"""

from __future__ import annotations

import mmap
import os
import socket
import sys

import msgspec

from common.errors import ProtocolError
from common.limits import ParseLimits
from parserd.sandbox import debug_mode_from_env, lock


def _workload() -> None:
    """What the real child does: read fd 0, decode, allocate, raise and catch, encode, write fd 1."""
    request = b""
    while chunk := os.read(0, 65536):
        request += chunk
    decoded = msgspec.msgpack.decode(request)
    blocks = [bytearray(1 << 20) for _ in range(16)]  # large blocks: mmap/munmap
    grow = bytearray()
    for _ in range(64):
        grow += bytes(64 * 1024)  # realloc of a large block: mremap
    try:
        raise ProtocolError("caught")
    except ProtocolError:
        pass
    del blocks, grow
    out = msgspec.msgpack.encode({"got": decoded, "ok": True})
    os.write(1, out)


def main() -> None:
    action = sys.argv[1]
    sock_family = socket.AF_UNIX  # socket module imported and ready before the lock
    lock(
        warm_up=lambda: None,
        max_dof_size=ParseLimits().max_dof_size,
        cpu_seconds=60,
        debug=debug_mode_from_env(),
    )
    if action == "workload":
        _workload()
    elif action == "open":
        open("/etc/hostname", "rb")  # noqa: SIM115 (the process dies here)
    elif action == "socket":
        socket.socket(sock_family, socket.SOCK_STREAM)
    elif action == "write-unpinned-fd":
        os.write(2, b"not allowed\n")
    elif action == "read-unpinned-fd":
        os.read(2, 1)
    elif action == "getpid":
        os.write(1, str(os.getpid()).encode())
    elif action == "mmap-exec":
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)
    elif action == "fork":
        os.fork()
    else:
        raise SystemExit(f"unknown action {action}")
    os._exit(0)


if __name__ == "__main__":
    main()
