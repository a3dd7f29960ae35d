"""Real failures at a chosen step: a seccomp user-notification filter in a forked writer.

:func:`run_failing_at` forks; the child (the writer under test) builds its
:class:`~dtprobed.stash.store.Stash`, then loads a seccomp filter whose
action for every write-type system call (mkdir, link, symlink, unlink,
rmdir, rename, setxattr, removexattr, truncate, chmod, write, open with
``O_CREAT`` or ``O_TMPFILE``) is ``SECCOMP_RET_USER_NOTIF``, and passes the
notification fd to the parent.  The parent lets each such call through
(``SECCOMP_USER_NOTIF_FLAG_CONTINUE``: the kernel then runs it for real)
except the *n*-th, which fails with *err* without running.  The child's
operation then takes its real error path; it reports the outcome back.

Nothing is mocked: the code under test is the real one, the failing call is a
real system call returning a real errno, and every other call really happens.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import pyseccomp

WRITE_SYSCALLS: Final = (
    "mkdir",
    "mkdirat",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "unlink",
    "unlinkat",
    "rmdir",
    "rename",
    "renameat",
    "renameat2",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "truncate",
    "ftruncate",
    "fchmod",
    "fchmodat",
    "write",
    "pwrite64",
    "writev",
    "fallocate",
)
_O_TMPFILE_BIT: Final = 0o20000000  # __O_TMPFILE
_NOTIF_RECV: Final = 0xC0502100  # SECCOMP_IOCTL_NOTIF_RECV, struct seccomp_notif (80 bytes)
_NOTIF_SEND: Final = 0xC0182101  # SECCOMP_IOCTL_NOTIF_SEND, struct seccomp_notif_resp (24)
_FLAG_CONTINUE: Final = 1
_WAIT_MS: Final = 60_000  # a hang is a failure, never a pass
T = TypeVar("T")


def _names() -> dict[int, str]:
    out = {}
    for name in (*WRITE_SYSCALLS, "open", "openat", "creat"):
        with contextlib.suppress(Exception):
            out[pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)] = name
    return out


def load_filter() -> int:
    """Load the notifying filter into this process (inherited across exec); its notify fd."""
    f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in WRITE_SYSCALLS:
        with contextlib.suppress(Exception):  # not every name exists on every arch
            f.add_rule(pyseccomp.NOTIFY, name)
    for name, arg in (("open", 1), ("openat", 2)):
        for bit in (os.O_CREAT, _O_TMPFILE_BIT):
            with contextlib.suppress(Exception):
                f.add_rule(
                    pyseccomp.NOTIFY, name, pyseccomp.Arg(arg, pyseccomp.MASKED_EQ, bit, bit)
                )
    with contextlib.suppress(Exception):
        f.add_rule(pyseccomp.NOTIFY, "creat")
    f.load()
    fd = int(pyseccomp._libseccomp.seccomp_notify_fd(f._filter))
    assert fd >= 0
    return fd


@dataclass
class Outcome:
    kind: str  # "ok": the operation returned; "error": it raised; "crash": anything else
    value: object  # its return value, or the error's errno
    message: str
    calls: list[str]  # the write-type calls the child made, in order
    failed: str | None  # the call that was made to fail, if any

    @property
    def injected(self) -> bool:
        return self.failed is not None


def run_failing_at(
    setup: Callable[[], T], operation: Callable[[T], object], n: int, err: int
) -> Outcome:
    """Fork; in the child run ``operation(setup())`` with its *n*-th write-type call failing.

    *setup* runs before the filter is loaded (e.g. opening the Stash and its
    start-up recovery).  ``n = 0`` fails nothing.  The operation's exceptions
    with an ``errno`` attribute are reported as ("error", errno, str).
    """
    parent_sock, child_sock = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        status = 0
        try:
            parent_sock.close()
            ctx = setup()
            nfd = load_filter()
            socket.send_fds(child_sock, [b"f"], [nfd])
            try:
                result: tuple[str, object, str] = ("ok", operation(ctx), "")
            except Exception as e:
                code = getattr(e, "errno", None)
                result = ("error", code, str(e)) if code else ("crash", None, repr(e))
            child_sock.sendall(json.dumps(result, default=repr).encode())
        except BaseException as e:
            with contextlib.suppress(BaseException):
                child_sock.sendall(json.dumps(("crash", None, repr(e))).encode())
            status = 1
        finally:
            os._exit(status)
    child_sock.close()
    names = _names()
    calls: list[str] = []
    failed = None
    try:
        _, fds, _, _ = socket.recv_fds(parent_sock, 16, 1)
        assert fds, "the child sent no notification fd (it failed before loading its filter)"
        nfd = fds[0]
        try:
            poller = select.poll()
            poller.register(nfd, select.POLLIN)
            while True:
                events = poller.poll(_WAIT_MS)
                assert events, "the child neither made a call nor exited within 60 s"
                if not events[0][1] & select.POLLIN:
                    break  # POLLHUP: the child exited
                buf = bytearray(80)
                try:
                    fcntl.ioctl(nfd, _NOTIF_RECV, buf)
                except OSError:
                    continue  # the caller died meanwhile
                (req_id,) = struct.unpack_from("<Q", buf, 0)
                (nr,) = struct.unpack_from("<i", buf, 16)
                calls.append(names.get(nr, str(nr)))
                if len(calls) == n:
                    failed = calls[-1]
                    resp = struct.pack("<QqiI", req_id, 0, -err, 0)
                else:
                    resp = struct.pack("<QqiI", req_id, 0, 0, _FLAG_CONTINUE)
                with contextlib.suppress(OSError):
                    fcntl.ioctl(nfd, _NOTIF_SEND, resp)
        finally:
            os.close(nfd)
        data = b""
        while chunk := parent_sock.recv(65536):
            data += chunk
    finally:
        parent_sock.close()
        _, status = os.waitpid(pid, 0)
    assert data, f"the child reported nothing (wait status {status})"
    kind, value, message = json.loads(data)
    return Outcome(kind, value, message, calls, failed)


def receive(nfd: int) -> tuple[int, str] | None:
    """The next notification (id, syscall name); None when no process uses the filter."""
    poller = select.poll()
    poller.register(nfd, select.POLLIN)
    names = _names()
    while True:
        events = poller.poll(_WAIT_MS)
        assert events, "no system call and no exit within 60 s"
        if not events[0][1] & select.POLLIN:
            return None
        buf = bytearray(80)
        try:
            fcntl.ioctl(nfd, _NOTIF_RECV, buf)
        except OSError:
            continue
        (req_id,) = struct.unpack_from("<Q", buf, 0)
        (nr,) = struct.unpack_from("<i", buf, 16)
        return req_id, names.get(nr, str(nr))


def let_through(nfd: int, req_id: int) -> None:
    """Let the notified call run for real."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(nfd, _NOTIF_SEND, struct.pack("<QqiI", req_id, 0, 0, _FLAG_CONTINUE))


#: Run as ``python -c WRAPPER SOCKFD ARGV…``: load the filter, pass its fd, exec ARGV.
WRAPPER: Final = """
import os, socket, sys
from tests.stash.faults import load_filter
sock = socket.socket(fileno=int(sys.argv[1]))
fd = load_filter()
socket.send_fds(sock, [b"f"], [fd])
sock.close()
os.close(fd)
os.execv(sys.argv[2], sys.argv[2:])
"""
