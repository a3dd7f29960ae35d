"""A fake kernel: the kernel side of the CUSE protocol over a SOCK_SEQPACKET socketpair.

This machine has no CUSE, so the CUSE device is tested against this double.
It does what fs/fuse/cuse.c and fs/fuse/ioctl.c (``fuse_do_ioctl``) do, not
what our daemon happens to expect:

* CUSE_INIT: sends ``cuse_init_in`` (7.38, offering CUSE_UNRESTRICTED_IOCTL)
  and checks the reply as ``cuse_process_init_reply`` does: major 7, minor ≥
  11, the device info NUL-terminated ``key=value`` strings with a DEVNAME.
* IOCTL: the first request carries no data (unrestricted) or ``_IOC_SIZE``
  bytes from ``arg`` (restricted).  A RETRY reply is checked like the kernel:
  refused (EIO) when restricted; ``in_iovs``/``out_iovs`` each and together
  ≤ FUSE_IOCTL_MAX_IOV (else ENOMEM); the data exactly 16 bytes per iovec
  (else EIO); the total length ≤ ``max_pages`` pages (else ENOMEM).  The
  ranges are then copied from the fake client memory (an unmapped byte: the
  client gets EFAULT and the daemon hears nothing more) and the ioctl is sent
  again with ``in_size`` = their total, the data appended in order.  A final
  reply with more data than ``out_size`` is EIO; ENOSYS becomes ENOTTY.
* Each request gets a fresh ``unique``; ``pid`` is the calling thread id.

Calls are generators (:meth:`FakeCuseKernel.ioctl_steps`) so a test can
interleave the round trips of several callers; :meth:`FakeCuseKernel.ioctl`
runs one to the end.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from common import fuse_abi as abi

PAGE_SIZE = 4096


class FakeMemory:
    """A client's address space: byte strings at fake addresses."""

    def __init__(self) -> None:
        self.regions: list[tuple[int, bytes]] = []

    def map(self, address: int, data: bytes) -> int:
        self.regions.append((address, data))
        return address

    def read(self, address: int, size: int) -> bytes:
        for base, data in self.regions:
            if base <= address and address + size <= base + len(data):
                return data[address - base : address - base + size]
        raise OSError(errno.EFAULT, f"fake client: {address:#x}+{size} not mapped")


@dataclass
class IoctlTrace:
    """What one call did: the ranges each retry asked for, and the messages sent."""

    retries: list[list[tuple[int, int]]] = field(default_factory=list)
    messages: int = 0


Tamper = Callable[[int, bytes], bytes]  # (round, data) -> data actually sent


class FakeCuseKernel:
    def __init__(self, *, max_pages: int = 32, minor: int = abi.FUSE_KERNEL_MINOR_VERSION) -> None:
        self.sock, self.daemon_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.max_pages = max_pages
        self.minor = minor
        self._unique = 0
        #: pid -> uid in the request header (default 0, root)
        self.uids: dict[int, int] = {}
        self._replies: dict[int, bytes] = {}
        self.devinfo: dict[str, str] = {}

    def daemon_fd(self) -> int:
        """The daemon's end, detached: the device server owns (and closes) it."""
        return self.daemon_sock.detach()

    def close(self) -> None:
        self.sock.close()
        if self.daemon_sock.fileno() >= 0:
            self.daemon_sock.close()

    # --- transport ---------------------------------------------------------------
    def send(self, opcode: int, body: bytes, *, pid: int = 0, nodeid: int = 0) -> int:
        self._unique += 2  # the kernel keeps the low bit for interrupts
        unique = self._unique
        size = abi.FUSE_IN_HEADER.size + len(body)
        uid = self.uids.get(pid, 0)  # the caller's fsuid, as the kernel reports it
        header = abi.FUSE_IN_HEADER.pack(size, opcode, unique, nodeid, uid, 0, pid, 0, 0)
        self.sock.send(header + body)
        return unique

    def reply(self, unique: int, timeout: float = 5.0) -> tuple[int, bytes]:
        """(error, body) of the reply to *unique*; other replies are kept for later."""
        while unique not in self._replies:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no reply to {unique}")
            msg = self.sock.recv(1 << 20)
            out = abi.FUSE_OUT_HEADER.unpack_from(msg)
            assert out.len == len(msg), "reply length field is wrong"
            assert -512 < out.error <= 0, "the kernel would refuse this error value"
            assert out.unique not in self._replies, "two replies to one request"
            self._replies[out.unique] = msg
        msg = self._replies.pop(unique)
        out = abi.FUSE_OUT_HEADER.unpack_from(msg)
        return -out.error, msg[abi.FUSE_OUT_HEADER.size :]

    def pending_reply(self, timeout: float = 0.1) -> bool:
        return bool(self._replies) or bool(select.select([self.sock], [], [], timeout)[0])

    # --- CUSE_INIT / OPEN --------------------------------------------------------------
    def cuse_init(self) -> dict[str, str]:
        body = abi.CUSE_INIT_IN.pack(
            abi.FUSE_KERNEL_VERSION, self.minor, abi.CUSE_UNRESTRICTED_IOCTL
        )
        err, out = self.reply(self.send(abi.CUSE_INIT, body))
        assert err == 0
        init = abi.CUSE_INIT_OUT.unpack_from(out)
        assert init.major == abi.FUSE_KERNEL_VERSION and init.minor >= abi.CUSE_MIN_MINOR_VERSION
        assert init.minor <= self.minor
        self.unrestricted = bool(init.flags & abi.CUSE_UNRESTRICTED_IOCTL)
        info = out[abi.CUSE_INIT_OUT.size :]
        assert 0 < len(info) <= abi.CUSE_INIT_INFO_MAX and info.endswith(b"\0")
        for item in info.split(b"\0"):
            if item:
                key, _, value = item.decode().partition("=")
                self.devinfo[key.strip()] = value.strip()
        assert self.devinfo.get("DEVNAME")
        return self.devinfo

    def open(self, pid: int) -> int:
        """OPEN's error (0 or an errno): ENOSYS is the server's "no open needed", after
        which the kernel opens without asking and sends no RELEASE (fc->no_open)."""
        err, _out = self.reply(self.send(abi.FUSE_OPEN, abi.FUSE_OPEN_IN.pack(2, 0), pid=pid))
        return err

    def flush(self, pid: int) -> int:
        body = bytes(abi.FUSE_FLUSH_IN.size)
        err, _out = self.reply(self.send(abi.FUSE_FLUSH, body, pid=pid))
        return err

    def release(self, pid: int, fh: int) -> None:
        body = abi.FUSE_RELEASE_IN.pack(fh, 2, 0, 0)
        assert self.reply(self.send(abi.FUSE_RELEASE, body, pid=pid))[0] == 0

    # --- IOCTL ------------------------------------------------------------------------------
    def ioctl_steps(
        self,
        pid: int,
        cmd: int,
        arg: int,
        memory: FakeMemory,
        *,
        fh: int = 1,
        tamper: Tamper | None = None,
        trace: IoctlTrace | None = None,
    ) -> Generator[None, None, int]:
        """One ioctl; yields after each round trip; returns the result or -errno."""
        unrestricted = self.unrestricted
        flags = abi.FUSE_IOCTL_UNRESTRICTED if unrestricted else 0
        in_iovs: list[tuple[int, int]] = []
        if not unrestricted and cmd >> 30 & 1:  # _IOC_WRITE: copy _IOC_SIZE bytes in
            in_iovs = [(arg, cmd >> 16 & 0x3FFF)]
        rounds = 0
        while True:
            try:
                data = b"".join(memory.read(base, size) for base, size in in_iovs)
            except OSError:
                return -errno.EFAULT
            if tamper is not None:
                data = tamper(rounds, data)
            rounds += 1
            body = abi.FUSE_IOCTL_IN.pack(fh, flags, cmd, arg, len(data), 0) + data
            unique = self.send(abi.FUSE_IOCTL, body, pid=pid)
            if trace is not None:
                trace.messages += 1
            err, out = self.reply(unique)
            yield
            if err:
                return -(errno.ENOTTY if err == errno.ENOSYS else err)
            result = abi.FUSE_IOCTL_OUT.unpack_from(out)
            extra = out[abi.FUSE_IOCTL_OUT.size :]
            if result.flags & abi.FUSE_IOCTL_RETRY:
                if not unrestricted:
                    return -errno.EIO
                n_in, n_out = result.in_iovs, result.out_iovs
                if n_in > abi.FUSE_IOCTL_MAX_IOV or n_out > abi.FUSE_IOCTL_MAX_IOV:
                    return -errno.ENOMEM
                if n_in + n_out > abi.FUSE_IOCTL_MAX_IOV:
                    return -errno.ENOMEM
                if len(extra) != (n_in + n_out) * abi.FUSE_IOCTL_IOVEC.size:
                    return -errno.EIO
                iovs = [
                    tuple(abi.FUSE_IOCTL_IOVEC.unpack_from(extra, i * abi.FUSE_IOCTL_IOVEC.size))
                    for i in range(n_in + n_out)
                ]
                limit = self.max_pages * PAGE_SIZE
                for group in (iovs[:n_in], iovs[n_in:]):
                    if sum(size for _, size in group) > limit:
                        return -errno.ENOMEM
                in_iovs = [(int(b), int(n)) for b, n in iovs[:n_in]]
                if trace is not None:
                    trace.retries.append(in_iovs)
                continue
            if len(extra) > 0:  # out_size is 0: we never ask for out iovecs
                return -errno.EIO
            return -errno.ENOTTY if result.result == -errno.ENOSYS else int(result.result)

    def ioctl(self, pid: int, cmd: int, arg: int, memory: FakeMemory, **kw: object) -> int:
        steps = self.ioctl_steps(pid, cmd, arg, memory, **kw)  # type: ignore[arg-type]
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return int(stop.value)
