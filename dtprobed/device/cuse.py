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
  sequence was abandoned (EFAULT, killed) starts clean.  Any message that
  does not carry exactly what we asked for ends its sequence with EINVAL.
* Partly fetched sequences are bounded (a client can abandon one at any step,
  and 64 abandoned 256 MiB sequences would otherwise hold 16 GiB):

  - *bytes*: a sequence counts the bytes it holds plus the chunk it asked
    for next (≤ 64 KiB) — never the size its header *claims*, so a header
    that claims 256 MiB costs what was actually copied (cost before
    allocation: the DOF grows as chunks arrive).  The count is bounded per
    uid (``max_pending_per_uid``: the caller's fsuid in ``fuse_in_header``)
    and in all (``max_pending_bytes``).  A chunk that would exceed either
    first expires stale sequences, and ends its sequence with EINVAL if it
    still does not fit.  One uid's abandoned sequences thus fill only its
    own share: another uid's registration is never refused for them while
    the total bound has room;
  - *time*: a sequence whose next retry has not come for ``sequence_expiry``
    seconds is dropped (checked whenever an ioctl starts and before a
    reservation).  The daemon sets it to :data:`SEQUENCE_EXPIRY_TIMEOUTS`
    times its ``-t`` timeout (30 s with the default 5 s); the kernel sends
    each retry as soon as it has copied the client's memory, so a live
    sequence never waits that long.  A retry arriving after its sequence
    expired is answered EINVAL, like any data without a request in
    progress.
* DTRACEHIOC_REMOVE passes the generation by value: it arrives with
  ``in_size`` 0 and ``arg`` = the generation (a C ``int``: 0xffffffff is -1);
  no retry is needed.  DTRACEHIOC_HASUSDT likewise passes an address by
  value: ``arg`` is the address, handed to the handler as is.  Dispatch is on
  ``_IOC_TYPE``/``_IOC_NR`` (:func:`common.ioctl.helper_ioctl_kind`), so the
  32-bit numbers of both are accepted.
* CUSE sends OPEN (node id 0), IOCTL, RELEASE; no LOOKUP or GETATTR.  Our
  ENOSYS to the first OPEN ends OPEN and RELEASE for the connection, as for
  a FUSE file (``DeviceServer._dispatch``).
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import select
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from common import fuse_abi as abi
from common.dof_abi import DOF_HDR, DOF_HELPER
from common.errors import ProtocolError, RequestRejected
from common.ioctl import helper_ioctl_kind
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
#: Default expiry of an abandoned sequence (the daemon uses SEQUENCE_EXPIRY_TIMEOUTS × -t).
STALE_SEQUENCE_S: Final = 30.0
SEQUENCE_EXPIRY_TIMEOUTS: Final = 6
#: Default bound on the DOF bytes held by partly fetched sequences, in all and per uid.
DEFAULT_MAX_PENDING_BYTES: Final = 1 << 30
DEFAULT_MAX_PENDING_PER_UID: Final = 512 << 20
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
    uid: int = -1
    stage: Literal["helper", "header", "data"] = "helper"
    expected: int = DOF_HELPER.size
    helper: bytes = b""
    address: int = 0
    loadsz: int = 0
    dof: bytearray = field(default_factory=bytearray)
    touched: float = 0.0
    reserved: int = 0  # bytes counted against max_pending_bytes and the uid's share


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
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_pending_per_uid: int = DEFAULT_MAX_PENDING_PER_UID,
        sequence_expiry: float = STALE_SEQUENCE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(fd, handler, max_dof_size=max_dof_size, log=log)
        self.path = path
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_per_uid = max_pending_per_uid
        self._pending_by_uid: dict[int, int] = {}
        self.sequence_expiry = sequence_expiry
        self._clock = clock
        # Ordered by last activity: a sequence is re-inserted at each step.
        self._sequences: dict[int, _Sequence] = {}
        self._pending_bytes = 0

    # --- set-up --------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str,
        handler: Handler,
        *,
        max_dof_size: int,
        log: logging.Logger,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_pending_per_uid: int = DEFAULT_MAX_PENDING_PER_UID,
        sequence_expiry: float = STALE_SEQUENCE_S,
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
            dev = cls.serve_fd(
                fd,
                devname,
                handler,
                max_dof_size=max_dof_size,
                log=log,
                path=path,
                max_pending_bytes=max_pending_bytes,
                max_pending_per_uid=max_pending_per_uid,
                sequence_expiry=sequence_expiry,
            )
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
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_pending_per_uid: int = DEFAULT_MAX_PENDING_PER_UID,
        sequence_expiry: float = STALE_SEQUENCE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> CuseDevice:
        """Answer CUSE_INIT on *fd* (``/dev/cuse``, or any transport that speaks the
        kernel side, such as the tests' fake kernel) and return the serving device.
        The caller keeps ownership of *fd* if this raises."""
        dev = cls(
            fd,
            path or "/dev/" + devname,
            handler,
            max_dof_size=max_dof_size,
            log=log,
            max_pending_bytes=max_pending_bytes,
            max_pending_per_uid=max_pending_per_uid,
            sequence_expiry=sequence_expiry,
            clock=clock,
        )
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
        self._pending_bytes = 0
        self._pending_by_uid.clear()

    # --- ioctls -------------------------------------------------------------------------
    def _on_ioctl(self, req: Request) -> None:
        args = req.args
        tid = int(req.header.pid)
        if tid == 0:
            self._refuse(req, _errno.EINVAL, "caller outside our pid namespace")
            return
        if not args.flags & abi.FUSE_IOCTL_UNRESTRICTED:
            self._refuse(req, _errno.EINVAL, "restricted ioctl on the CUSE device")
            return
        if not req.payload:
            self._start(req, tid)
        else:
            self._continue(req, tid)

    def _start(self, req: Request, tid: int) -> None:
        """An ioctl as the client issued it (no data yet)."""
        args = req.args
        old = self._sequences.pop(tid, None)
        if old is not None:
            self._release(old)
            self.log.debug("tid %d: abandoned ADDDOF sequence dropped", tid)
        self.expire_stale()
        kind = helper_ioctl_kind(int(args.cmd))
        if kind == "adddof":
            seq = _Sequence(
                int(args.cmd), int(args.arg), uid=int(req.header.uid), touched=self._clock()
            )
            self._sequences[tid] = seq
            self.send(proto.encode_ioctl_retry(req.unique, [(int(args.arg), DOF_HELPER.size)]))
        elif kind is not None:  # REMOVE, HASUSDT: by value, no retry
            self._call_by_value(req.unique, tid, kind, int(args.arg), int(req.header.uid))
        else:
            self._refuse(req, _errno.EINVAL, f"unknown ioctl {args.cmd:#x}")

    def _continue(self, req: Request, tid: int) -> None:
        """A retry: the kernel re-sent the ioctl with the client memory we asked for."""
        args = req.args
        seq = self._sequences.pop(tid, None)  # back in only if the sequence goes on
        data = req.payload
        want = 0
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
            if len(seq.dof) < seq.loadsz:
                want = min(DOF_CHUNK, seq.loadsz - len(seq.dof))
                self._reserve(seq, len(seq.dof) + want)
        except RequestRejected as err:
            if seq is not None:
                self._release(seq)
            self._refuse(req, err.errno, err.reason)
            return
        if len(seq.dof) < seq.loadsz:
            seq.expected = want
            self._ask(req.unique, tid, seq, seq.address + len(seq.dof), want)
            return
        self._release(seq)  # the receiver counts it from here on
        request = HelperRequest(tid, "adddof", seq.helper, bytes(seq.dof), -1, uid=seq.uid)
        self._call_handler(req.unique, request)

    def _ask(self, unique: int, tid: int, seq: _Sequence, address: int, size: int) -> None:
        seq.touched = self._clock()
        self._sequences[tid] = seq  # at the end: the dict stays ordered by activity
        self.send(proto.encode_ioctl_retry(unique, [(address, size)]))

    def _reserve(self, seq: _Sequence, total: int) -> None:
        """Count *total* bytes for *seq* (what it holds and its next chunk), or refuse."""
        more = total - seq.reserved
        uid = seq.uid
        if not self._fits(uid, more):
            self.expire_stale()
        if not self._fits(uid, more):
            raise RequestRejected(
                _errno.EINVAL,
                f"dofh_loadsz {seq.loadsz}: uid {uid} holds "
                f"{self._pending_by_uid.get(uid, 0)} bytes of partly fetched DOF "
                f"(limit {self.max_pending_per_uid}), all {self._pending_bytes} "
                f"(limit {self.max_pending_bytes})",
            )
        seq.reserved = total
        self._pending_bytes += more
        self._pending_by_uid[uid] = self._pending_by_uid.get(uid, 0) + more

    def _fits(self, uid: int, more: int) -> bool:
        return (
            self._pending_bytes + more <= self.max_pending_bytes
            and self._pending_by_uid.get(uid, 0) + more <= self.max_pending_per_uid
        )

    def _release(self, seq: _Sequence) -> None:
        if seq.reserved:
            self._pending_bytes -= seq.reserved
            left = self._pending_by_uid.get(seq.uid, 0) - seq.reserved
            if left > 0:
                self._pending_by_uid[seq.uid] = left
            else:
                self._pending_by_uid.pop(seq.uid, None)
        seq.reserved = 0

    def expire_stale(self) -> int:
        """Drop sequences idle for ``sequence_expiry`` seconds; how many were dropped."""
        horizon = self._clock() - self.sequence_expiry
        expired = 0
        while self._sequences:
            tid, seq = next(iter(self._sequences.items()))
            if seq.touched > horizon:
                break
            del self._sequences[tid]
            self._release(seq)
            expired += 1
            self.log.debug("tid %d: abandoned ADDDOF sequence expired (%s)", tid, seq.stage)
        return expired

    def sequences_in_flight(self) -> int:
        """How many threads are mid-ADDDOF (for tests and debug logs)."""
        return len(self._sequences)

    def pending_bytes(self, uid: int | None = None) -> int:
        """DOF bytes held by partly fetched sequences, of *uid* or all (tests, debug logs)."""
        if uid is not None:
            return self._pending_by_uid.get(uid, 0)
        return self._pending_bytes


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
