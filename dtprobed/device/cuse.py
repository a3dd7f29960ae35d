"""CUSE mode: ``/dev/dtrace/helper`` as a character device served through ``/dev/cuse``.

Upstream's choice; needs ``CONFIG_CUSE`` (Debian/Ubuntu/Oracle kernels build it
as a module; this machine has none, so the tests use a fake kernel and the
CUSE VM).  Facts we rely on (fs/fuse/cuse.c, fs/fuse/ioctl.c ``fuse_do_ioctl``):

* Opening ``/dev/cuse`` queues CUSE_INIT (``cuse_init_in``: 7.x, offered
  flags).  We answer ``cuse_init_out`` with ``CUSE_UNRESTRICTED_IOCTL`` and
  major/minor 0 (the kernel picks a free one), followed by the device info
  ``"DEVNAME=<name>\\0"``; the kernel then registers the char device and
  devtmpfs creates ``/dev/<name>`` (mode 0600; udev or we make it 0666).  If
  the kernel refuses the reply (name taken, bad info) it aborts the
  connection: the fd then polls POLLERR and reads fail with ENODEV.
* With unrestricted ioctls the kernel copies *nothing* at first: the ioctl
  arrives with ``in_size`` 0 and the raw ``arg``.  The server answers
  ``FUSE_IOCTL_RETRY`` with iovecs (client address, length); the kernel
  copies those ranges and sends the ioctl *again*, as a new request with a
  new ``unique``, ``in_size`` = the sum of the lengths and the data appended
  in order.  At most ``FUSE_IOCTL_MAX_IOV`` (256) iovecs, at most the
  connection's ``max_pages`` (32 pages = 128 KiB by default) in total; the
  retry reply's data must be exactly 16 bytes per iovec (else EIO).  A range
  the client cannot read fails *the client's* ioctl with EFAULT and we never
  hear of it: a sequence can be abandoned at any step.
* So every ADDDOF takes: ask 80 bytes at ``arg`` (the ``dof_helper_t``) → ask
  64 bytes at ``dofhp_dof`` (the header; ``dofh_loadsz`` checked against
  the limit) → ask the remaining ``loadsz - 64`` bytes in chunks of at most
  64 KiB → call the handler.  ``loadsz`` ≤ 64 KiB: 4 round trips, as upstream.
* Sequences are kept per calling *thread* (``fuse_in_header.pid``): threads
  of one process, and different processes, interleave freely.  A message
  with ``in_size`` 0 always starts a new ioctl, so a thread whose previous
  sequence was abandoned (EFAULT, killed) starts clean; state of threads that
  never come back is dropped after :data:`STALE_SEQUENCE_S`.  Any message that
  does not carry exactly what we asked for ends its sequence with EINVAL.
* DTRACEHIOC_REMOVE passes the generation by value: it arrives with
  ``in_size`` 0 and ``arg`` = the generation; no retry is needed.
* CUSE sends OPEN (node id 0), IOCTL, RELEASE; no LOOKUP or GETATTR.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import select
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from common import fuse_abi as abi
from common.dof_abi import DOF_HDR, DOF_HELPER
from common.errors import ProtocolError, RequestRejected
from common.ioctl import DTRACEHIOC_ADDDOF, DTRACEHIOC_REMOVE
from dtprobed.device import fuse_proto as proto
from dtprobed.device import mount
from dtprobed.device.errors import DeviceError
from dtprobed.device.request import Handler, HelperRequest, check_dof_header, helper_dof_address
from dtprobed.device.server import DeviceServer

if TYPE_CHECKING:
    from dtprobed.device.fuse_proto import Request

CUSE_PATH: Final = "/dev/cuse"
DOF_CHUNK: Final = 64 * 1024  # bytes per retry, as upstream (DOF_CHUNKSZ)
INIT_TIMEOUT_S: Final = 5.0
NODE_TIMEOUT_S: Final = 5.0
STALE_SEQUENCE_S: Final = 30.0
_PRUNE_ABOVE: Final = 64  # sequences in flight before stale ones are looked for
_ADDRESS_LIMIT: Final = 1 << 64


def devname_for(path: str) -> str | None:
    """The CUSE device name for an absolute helper path under /dev, else None."""
    path = os.path.normpath(path)
    if not path.startswith("/dev/") or path == "/dev/":
        return None
    name = path[len("/dev/") :]
    if not name or name.startswith("/") or ".." in name.split("/"):
        return None
    return name


@dataclass
class _Sequence:
    """One thread's ADDDOF in progress: what we asked for last, and what we have."""

    cmd: int
    arg: int
    stage: Literal["helper", "header", "data"] = "helper"
    expected: int = DOF_HELPER.size
    helper: bytes = b""
    address: int = 0
    loadsz: int = 0
    dof: bytearray = field(default_factory=bytearray)
    touched: float = field(default_factory=time.monotonic)


class CuseDevice(DeviceServer):
    """A CUSE character device serving the helper ioctls (unrestricted, with retries)."""

    mode: Literal["cuse"] = "cuse"

    def __init__(
        self,
        fd: int,
        path: str,
        handler: Handler,
        *,
        max_dof_size: int,
        log: logging.Logger | None,
    ) -> None:
        super().__init__(fd, handler, max_dof_size=max_dof_size, log=log)
        self.path = path
        self._sequences: dict[int, _Sequence] = {}

    # --- set-up --------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str, handler: Handler, *, max_dof_size: int, log: logging.Logger
    ) -> CuseDevice:
        """Create ``/dev/<name>`` through /dev/cuse; raise DeviceError if the kernel can't."""
        devname = devname_for(path)
        if devname is None:
            raise DeviceError(f"CUSE mode needs a helper path under /dev, not {path}")
        _clear_path(path, log)
        try:
            fd = os.open(CUSE_PATH, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise DeviceError(f"cannot open {CUSE_PATH}: {err.strerror}") from err
        try:
            dev = cls.serve_fd(fd, devname, handler, max_dof_size=max_dof_size, log=log, path=path)
            dev._wait_for_node()
        except BaseException:
            os.close(fd)
            raise
        log.info("serving %s (CUSE, protocol 7.%d)", path, dev.proto_minor)
        return dev

    @classmethod
    def serve_fd(
        cls,
        fd: int,
        devname: str,
        handler: Handler,
        *,
        max_dof_size: int,
        log: logging.Logger | None,
        path: str | None = None,
    ) -> CuseDevice:
        """Answer CUSE_INIT on *fd* (``/dev/cuse``, or any transport that speaks the
        kernel side, such as the tests' fake kernel) and return the serving device.
        The caller keeps ownership of *fd* if this raises."""
        dev = cls(fd, path or "/dev/" + devname, handler, max_dof_size=max_dof_size, log=log)
        dev._handshake(devname)
        return dev

    def _handshake(self, devname: str) -> None:
        ready, _, _ = select.select([self._fd], [], [], INIT_TIMEOUT_S)
        if not ready:
            raise DeviceError("no CUSE_INIT from the kernel")
        msg = self._read_message()
        if msg is None:
            raise DeviceError("no CUSE_INIT from the kernel")
        try:
            req = proto.decode_request(msg)
        except ProtocolError as err:
            raise DeviceError(f"bad CUSE_INIT: {err}") from err
        if req.opcode != abi.CUSE_INIT:
            raise DeviceError(f"expected CUSE_INIT, got {req.name}")
        if req.args.major != abi.FUSE_KERNEL_VERSION or req.args.minor < abi.CUSE_MIN_MINOR_VERSION:
            raise DeviceError(f"unsupported CUSE protocol {req.args.major}.{req.args.minor}")
        minor = min(int(req.args.minor), abi.FUSE_KERNEL_MINOR_VERSION)
        reply = proto.encode_cuse_init(
            req.unique,
            minor=minor,
            flags=abi.CUSE_UNRESTRICTED_IOCTL,
            max_read=4096,
            max_write=4096,
            devname=devname,
        )
        if not self.send(reply):
            raise DeviceError("CUSE_INIT reply refused")
        self.proto_minor = minor
        self._set_nonblocking()

    def _wait_for_node(self) -> None:
        """Wait until the kernel created the device node (or aborted); make it 0666."""
        poller = select.poll()
        poller.register(self._fd, select.POLLERR | select.POLLHUP)
        deadline = time.monotonic() + NODE_TIMEOUT_S
        while True:
            try:
                st = os.lstat(self.path)
                if stat.S_ISCHR(st.st_mode):
                    os.chmod(self.path, 0o666)  # udev's rule does the same; any user registers
                    return
            except FileNotFoundError:
                pass
            for _, events in poller.poll(20):
                if events & (select.POLLERR | select.POLLHUP):
                    raise DeviceError(f"the kernel refused CUSE device {self.path} (name taken?)")
            if time.monotonic() > deadline:
                raise DeviceError(f"CUSE device node {self.path} did not appear")

    def close(self) -> None:
        """Close the connection; the kernel removes the device node.  Idempotent."""
        self._close_fd()
        self._sequences.clear()

    # --- ioctls -------------------------------------------------------------------------
    def _on_ioctl(self, req: Request) -> None:
        args = req.args
        tid = int(req.header.pid)
        if tid == 0:
            self._refuse(req.unique, tid, _errno.EINVAL, "caller outside our pid namespace")
            return
        if not args.flags & abi.FUSE_IOCTL_UNRESTRICTED:
            self._refuse(req.unique, tid, _errno.EINVAL, "restricted ioctl on the CUSE device")
            return
        if not req.payload:
            self._start(req, tid)
        else:
            self._continue(req, tid)

    def _start(self, req: Request, tid: int) -> None:
        """An ioctl as the client issued it (no data yet)."""
        args = req.args
        if self._sequences.pop(tid, None) is not None:
            self.log.debug("tid %d: abandoned ADDDOF sequence dropped", tid)
        if args.cmd == DTRACEHIOC_REMOVE:
            gen = int(args.arg) & 0xFFFFFFFF  # the C int drti passed by value
            self._call_handler(req.unique, HelperRequest(tid, "remove", b"", b"", gen))
        elif args.cmd == DTRACEHIOC_ADDDOF:
            self._prune_stale()
            self._sequences[tid] = _Sequence(int(args.cmd), int(args.arg))
            self.send(proto.encode_ioctl_retry(req.unique, [(int(args.arg), DOF_HELPER.size)]))
        else:
            self._refuse(req.unique, tid, _errno.EINVAL, f"unknown ioctl {args.cmd:#x}")

    def _continue(self, req: Request, tid: int) -> None:
        """A retry: the kernel re-sent the ioctl with the client memory we asked for."""
        args = req.args
        seq = self._sequences.pop(tid, None)  # back in only if the sequence goes on
        data = req.payload
        try:
            if seq is None:
                raise RequestRejected(_errno.EINVAL, "ioctl data without a request in progress")
            if args.cmd != seq.cmd or args.arg != seq.arg:
                raise RequestRejected(_errno.EINVAL, "retry for a different ioctl")
            if len(data) != seq.expected:
                raise RequestRejected(
                    _errno.EINVAL,
                    f"{seq.stage}: asked {seq.expected} bytes, the retry brought {len(data)}",
                )
            if seq.stage == "helper":
                seq.helper = data
                seq.address = helper_dof_address(data)
                seq.stage, seq.expected = "header", DOF_HDR.size
                self._ask(req.unique, tid, seq, seq.address, DOF_HDR.size)
                return
            if seq.stage == "header":
                seq.loadsz = check_dof_header(data, self.max_dof_size)
                if seq.address + seq.loadsz > _ADDRESS_LIMIT:
                    raise RequestRejected(_errno.EINVAL, "DOF wraps the address space")
                seq.dof = bytearray(data)
                seq.stage = "data"
            else:
                seq.dof += data
        except RequestRejected as err:
            self._refuse(req.unique, tid, err.errno, err.reason)
            return
        if len(seq.dof) < seq.loadsz:
            want = min(DOF_CHUNK, seq.loadsz - len(seq.dof))
            seq.expected = want
            self._ask(req.unique, tid, seq, seq.address + len(seq.dof), want)
            return
        request = HelperRequest(tid, "adddof", seq.helper, bytes(seq.dof), -1)
        self._call_handler(req.unique, request)

    def _ask(self, unique: int, tid: int, seq: _Sequence, address: int, size: int) -> None:
        seq.touched = time.monotonic()
        self._sequences[tid] = seq
        self.send(proto.encode_ioctl_retry(unique, [(address, size)]))

    def _prune_stale(self) -> None:
        if len(self._sequences) <= _PRUNE_ABOVE:
            return
        horizon = time.monotonic() - STALE_SEQUENCE_S
        for tid in [t for t, s in self._sequences.items() if s.touched < horizon]:
            del self._sequences[tid]

    def sequences_in_flight(self) -> int:
        """How many threads are mid-ADDDOF (for tests and debug logs)."""
        return len(self._sequences)


def _clear_path(path: str, log: logging.Logger) -> None:
    """Make room for the kernel's device node at *path*, or refuse if someone serves it.

    devtmpfs silently fails to create a node over an existing file, so a
    leftover empty placeholder of a FUSE-mode daemon is removed, a stale FUSE
    mount detached, and a live mount or an existing character device refused.
    """
    mount.prepare(path, mount.MountView(), log, create_missing=False)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        log.warning("%s: removing an empty leftover file to make room for the device", path)
        os.unlink(path)
        return
    raise DeviceError(f"{path} exists and is not ours to replace")
