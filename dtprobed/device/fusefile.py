"""FUSE-file mode: the helper is a one-file FUSE filesystem mounted on the helper path.

Used where the kernel has no CUSE (this machine).  Unmodified clients open the
same path and issue the same ioctls.  Facts we rely on (fs/fuse/ioctl.c,
``fuse_do_ioctl``; checked on this machine's 6.18 kernel by the tests in
``tests/device/``):

* ioctls on a FUSE *file* are *restricted*: the kernel copies
  ``_IOC_SIZE(cmd)`` bytes from the pointer argument for ``_IOW`` commands
  and forwards them as the ioctl's in-data; the server may not ask for more
  (a RETRY reply gets EIO).  ``DTRACEHIOC_ADDDOF = _IOW(0xd8, 3, 80)`` thus
  delivers the 80-byte ``dof_helper_t``; the DOF itself is read from the
  calling thread with ``process_vm_readv`` — **not here**: the request goes
  to the handler with ``remote=True`` and the receiver fetches it off the
  device loop through a fetch helper process (:mod:`dtprobed.device.fetch`),
  because a page of the caller may lie on a FUSE file system whose READ
  never completes, and the thread that touches it can then be neither
  cancelled nor killed (before this, one such client hung every other
  client, even ``open()``, and SIGTERM).  The device thread reads nothing
  but ``/dev/fuse``.
* ``DTRACEHIOC_REMOVE = _IOW(0xd8, 2, int)`` is issued with the generation
  *by value*, so the kernel tries to copy 4 bytes from address ``gen``: that
  faults and the client's ioctl fails with **EFAULT without the daemon
  hearing of it**.  Exit/exec pruning removes such registrations.  (Should a
  generation number happen to be a readable address in the client, the
  request does arrive; ``fuse_ioctl_in.arg`` still holds the value and we
  forward it as a REMOVE of that generation, decoded as a C ``int``.)
* ``DTRACEHIOC_HASUSDT = _IOW(0xd8, 4, void *)`` (dtrace ≥ 2.0.3) passes the
  address of a function inside the registering object *by value*.  That
  address is readable code, so the kernel's copy succeeds and the request
  arrives: measured on this machine's 6.18 kernel with a C client calling
  ``ioctl(fd, 0x4008D804, (void *)&main)``: ``in_size`` 8, ``out_size`` 0,
  ``flags`` 0, ``arg`` = ``&main`` (0x564fbc3b9199), payload = the first 8
  bytes of ``main``'s code (``55 48 89 e5 48 83 ec 30``: ``push %rbp; mov
  %rsp,%rbp; sub $0x30,%rsp``).  The 32-bit number 0x4004D804 brings 4
  bytes.  We take the address from ``arg`` and ignore the payload.  An
  address that is not readable fails the client with EFAULT and never
  reaches us.  Dispatch is on ``_IOC_TYPE``/``_IOC_NR``
  (:func:`common.ioctl.helper_ioctl_kind`).
* ``fuse_in_header.pid`` is the calling thread's id in our pid namespace, 0
  when the caller is outside it (refused: we could not read its memory).
* ioctl results travel in ``fuse_ioctl_out.result``; a handler's ENOSYS would
  be turned into ENOTTY by the kernel.

The filesystem: root inode 1 is a regular file, mode 0666, owner root, size
0; LOOKUP finds nothing; OPEN and FLUSH are ENOSYS, so the kernel stops sending
them (and RELEASE: see ``DeviceServer._dispatch``); everything else we do not
need is ENOSYS too.  See :mod:`dtprobed.device.mount` for mounting, the host mount
namespace and stale mounts.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import select
import time
from typing import TYPE_CHECKING, Final, Literal

from common import fuse_abi as abi
from common.dof_abi import DOF_HELPER
from common.errors import ProtocolError
from common.ioctl import helper_ioctl_kind
from dtprobed.device import fuse_proto as proto
from dtprobed.device import mount
from dtprobed.device.errors import DeviceError
from dtprobed.device.request import Handler, HelperRequest
from dtprobed.device.server import DeviceServer

if TYPE_CHECKING:
    from dtprobed.device.fuse_proto import Request

FUSE_DEVICE: Final = "/dev/fuse"
INIT_TIMEOUT_S: Final = 5.0
MAX_WRITE: Final = 4096  # we serve no writes; the kernel's minimum


class FuseFileDevice(DeviceServer):
    """A mounted one-file FUSE filesystem serving the helper ioctls."""

    mode: Literal["fuse"] = "fuse"

    def __init__(
        self,
        fd: int,
        point: mount.MountPoint,
        handler: Handler,
        *,
        max_dof_size: int,
        log: logging.Logger | None,
    ) -> None:
        super().__init__(fd, handler, max_dof_size=max_dof_size, log=log)
        self.path = point.path
        self._point = point
        self._mtime = int(time.time())

    @classmethod
    def open(
        cls,
        path: str,
        handler: Handler,
        *,
        max_dof_size: int,
        log: logging.Logger,
        host_ns_pid: int = 1,
    ) -> FuseFileDevice:
        """Open /dev/fuse, mount it on *path* and answer INIT; raise DeviceError on failure."""
        try:
            fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise DeviceError(f"cannot open {FUSE_DEVICE}: {err.strerror}") from err
        point: mount.MountPoint | None = None
        try:
            view = mount.host_view(host_ns_pid, log)
            point = mount.prepare(path, view, log)
            mount.mount_fuse(point, fd)
            dev = cls(fd, point, handler, max_dof_size=max_dof_size, log=log)
            dev._handshake()
        except BaseException:
            if point is not None:
                mount.unmount(point, log)
                mount.cleanup(point, log)
            os.close(fd)
            raise
        log.info("serving %s (FUSE file, protocol 7.%d)", path, dev.proto_minor)
        return dev

    def _handshake(self) -> None:
        """Answer FUSE_INIT, which the kernel sends as soon as the mount exists."""
        while True:
            ready, _, _ = select.select([self._fd], [], [], INIT_TIMEOUT_S)
            if not ready:
                raise DeviceError("no FUSE_INIT from the kernel")
            msg = self._read_message()
            if msg is None:
                continue
            try:
                req = proto.decode_request(msg)
            except ProtocolError as err:
                raise DeviceError(f"bad FUSE_INIT: {err}") from err
            if req.opcode != abi.FUSE_INIT:
                raise DeviceError(f"expected FUSE_INIT, got {req.name}")
            minor = min(int(req.args.minor), abi.FUSE_KERNEL_MINOR_VERSION)
            self.send(
                proto.encode_init(
                    req.unique,
                    minor=minor,
                    max_readahead=int(req.args.max_readahead),
                    max_write=MAX_WRITE,
                )
            )
            if req.args.major == abi.FUSE_KERNEL_VERSION:
                self.proto_minor = minor
                break
            if req.args.major < abi.FUSE_KERNEL_VERSION:
                raise DeviceError(f"kernel FUSE protocol {req.args.major} is too old")
            # A newer major: the kernel re-sends INIT with ours.
        self._set_nonblocking()

    def _on_ioctl(self, req: Request) -> None:
        args = req.args
        tid = int(req.header.pid)
        kind = helper_ioctl_kind(int(args.cmd))
        if tid == 0:
            self._refuse(req, _errno.EINVAL, "caller outside our pid namespace")
        elif kind == "adddof":
            if len(req.payload) != DOF_HELPER.size:
                self._refuse(req, _errno.EINVAL, f"helper of {len(req.payload)} bytes")
                return
            request = HelperRequest(
                tid, "adddof", req.payload, b"", -1, uid=int(req.header.uid), remote=True
            )
            self._call_handler(req.unique, request)
        elif kind is not None:
            # REMOVE or HASUSDT, argument by value: the kernel copied _IOC_SIZE bytes
            # from it as if it were a pointer (the payload, ignored); the value is arg.
            self.log.debug(
                "tid %d: %s arg=%#x in_size=%d", tid, kind, int(args.arg), int(args.in_size)
            )
            self._call_by_value(req.unique, tid, kind, int(args.arg), int(req.header.uid))
        else:
            self._refuse(req, _errno.EINVAL, f"unknown ioctl {args.cmd:#x}")

    def close(self) -> None:
        """Unmount, close the connection, remove the placeholder we created.  Idempotent."""
        mount.unmount(self._point, self.log)
        self._close_fd()
        mount.cleanup(self._point, self.log)
