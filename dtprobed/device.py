"""The helper device: what the FUSE-file and CUSE modes share, and how to open one.

Interface for the receiver
--------------------------
::

    dev = open_device("auto" | "cuse" | "fuse", "/dev/dtrace/helper", handler,
                      max_dof_size=..., log=logger)
    # dev.mode is "fuse" or "cuse", dev.path the helper path
    sel.register(dev.fileno(), EVENT_READ)       # or: dev.run(stop_event)
    ... when readable: while dev.serve_once(): pass
    dev.close()                                  # unmounts / removes the device

``handler(request, reply)`` is called from ``serve_once`` (the thread that
serves the device) with a complete :class:`HelperRequest`: the device layer has
already fetched the 80-byte ``dof_helper_t`` and exactly ``dofh_loadsz`` bytes
of DOF from the caller.  ``reply(result)`` answers the client's ``ioctl``:
``result >= 0`` is the ioctl's return value (the generation), ``-errno`` makes
it fail with that errno.  ``reply`` may be called later and from any thread
(each reply is one ``write`` to the device, which the kernel takes whole); only
the first call counts, later ones are logged and ignored.  A handler that
raises :class:`common.errors.RequestRejected` answers ``-errno``; any other
exception is our bug: logged with its traceback, answered ``-EIO``.

Requests the device layer refuses without calling the handler (each logged
at WARNING with the thread id and the reason), all answered EINVAL as
upstream answers every ADDDOF error: a helper of the wrong size, a DOF header
that cannot be read or whose ``dofh_loadsz`` is below 64 or above
``max_dof_size``, DOF memory that cannot be read (EFAULT from
``process_vm_readv``), a CUSE retry answered with the wrong sizes, an unknown
ioctl command.  A ``dofh_loadsz`` above the limit is EINVAL, not E2BIG: the
client library (drti) only reports failure, and upstream's own limit check
answers EINVAL too.

Errors at set-up (:class:`DeviceError` and subclasses) are fatal for the
daemon: the CLI maps them to exit status 1.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import selectors
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Protocol

from common import fuse_abi as abi
from common.dof_abi import DOF_HDR, DOF_HELPER
from common.errors import DtprobedError, ProtocolError, RequestRejected
from dtprobed import fuse_proto as proto

if TYPE_CHECKING:
    from dtprobed.fuse_proto import Request

DeviceMode = Literal["auto", "cuse", "fuse"]


@dataclass(frozen=True)
class HelperRequest:
    """One complete client request, as the receiver sees it.

    ``tid`` is the calling thread (``fuse_in_header.pid``; convert it to the
    process with ``/proc``).  ADDDOF: ``helper`` is the 80-byte
    ``dof_helper_t``, ``dof`` exactly ``dofh_loadsz`` bytes whose first 64 are
    the header whose ``loadsz`` was checked, ``gen`` is -1.  REMOVE: ``helper``
    and ``dof`` are empty and ``gen`` is the generation the client passed.
    """

    tid: int
    kind: Literal["adddof", "remove"]
    helper: bytes
    dof: bytes
    gen: int


Reply = Callable[[int], None]
Handler = Callable[[HelperRequest, Reply], None]


class HelperDevice(Protocol):
    """What :func:`open_device` returns; see the module docstring."""

    @property
    def mode(self) -> Literal["cuse", "fuse"]: ...
    @property
    def path(self) -> str: ...
    def fileno(self) -> int: ...
    def serve_once(self) -> bool: ...
    def run(self, stop: threading.Event) -> None: ...
    def close(self) -> None: ...


class DeviceError(DtprobedError):
    """The helper device cannot be set up (fatal: bad path, no /dev/fuse, mount refused)."""


class DeviceBusy(DeviceError):
    """The helper path is already served by a live daemon (or another device is there)."""


class DeviceGone(DeviceError):
    """The kernel ended the connection while we served it (unmounted, aborted)."""


def check_dof_header(header: bytes, max_dof_size: int) -> int:
    """``dofh_loadsz`` of a 64-byte DOF header, bounded before anything is allocated."""
    if len(header) != DOF_HDR.size:
        raise RequestRejected(_errno.EINVAL, f"DOF header of {len(header)} bytes")
    loadsz = int(DOF_HDR.unpack_from(header).loadsz)
    if loadsz < DOF_HDR.size:
        raise RequestRejected(_errno.EINVAL, f"dofh_loadsz {loadsz} smaller than its header")
    if loadsz > max_dof_size:
        raise RequestRejected(_errno.EINVAL, f"dofh_loadsz {loadsz} exceeds limit {max_dof_size}")
    return loadsz


def helper_dof_address(helper: bytes) -> int:
    """``dofhp_dof`` of an 80-byte ``dof_helper_t``."""
    return int(DOF_HELPER.unpack_from(helper).dof)


# Reads must fit the largest request we can get: an ioctl carrying one 64 KiB
# CUSE chunk (or, in FUSE mode, at most the kernel's default 32 pages), plus headers.
READ_BUFFER_SIZE: Final = abi.FUSE_IN_HEADER.size + abi.FUSE_IOCTL_IN.size + (128 << 10) + 4096
ATTR_VALID_S: Final = 3600  # the file's attributes never change while we serve it
_FILE_MODE: Final = abi.S_IFREG | 0o666


class _ReplyOnce:
    """The ``reply`` callable handed to the handler: answers one ioctl exactly once."""

    __slots__ = ("_done", "_lock", "_server", "_tid", "_unique")

    def __init__(self, server: DeviceServer, unique: int, tid: int) -> None:
        self._server = server
        self._unique = unique
        self._tid = tid
        self._done = False
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._done

    def __call__(self, result: int) -> None:
        with self._lock:
            if self._done:
                self._server.log.warning("tid %d: second reply (%d) ignored", self._tid, result)
                return
            self._done = True
        if result >= 0:
            data = proto.encode_ioctl(self._unique, result)
        else:
            data = proto.encode_error(self._unique, -result)
        self._server.send(data)


class DeviceServer:
    """Serves one FUSE or CUSE connection: read a request, dispatch, write replies.

    Subclasses implement :meth:`_on_ioctl` (and the set-up / tear-down of their
    device).  The fd is non-blocking: :meth:`serve_once` returns False at once
    when nothing is queued.  Facts we rely on (Documentation/filesystems/fuse.rst):

    * one ``read`` returns exactly one request and needs a buffer of at least
      ``FUSE_MIN_READ_BUFFER``; a request larger than the buffer is failed
      with EIO by the kernel, which is why :data:`READ_BUFFER_SIZE` covers the
      largest ioctl chunk we ask for;
    * one ``write`` is one whole reply; writing a reply for a request the
      kernel has already ended (client gone, connection aborted) fails with
      ENOENT, which is harmless;
    * INTERRUPT may be ignored entirely: the interrupted request still gets
      its real answer.  We do, so a client hit by a signal in its constructor
      still learns its generation; a client killed by SIGKILL waits (in the
      kernel) for that answer, which the receiver's timeout bounds;
    * FORGET and BATCH_FORGET take no reply.
    """

    mode: Literal["cuse", "fuse"]

    def __init__(
        self, fd: int, handler: Handler, *, max_dof_size: int, log: logging.Logger | None
    ) -> None:
        self._fd = fd  # -1 once closed, so a stale number never reaches a reused fd
        self._fd_lock = threading.Lock()
        self._handler = handler
        self.max_dof_size = max_dof_size
        self.log = log or logging.getLogger("dtprobed.device")
        self._buf = bytearray(READ_BUFFER_SIZE)
        self._next_fh = 1
        self._mtime = 0
        self.proto_minor = 0

    # --- transport -----------------------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    def _read_message(self) -> memoryview | None:
        """One request, or None if none is queued.  Raises DeviceGone at the end."""
        try:
            n = os.readv(self._fd, [self._buf])
        except BlockingIOError:
            return None
        except OSError as err:
            if err.errno == _errno.ENOENT:  # the request was withdrawn while we read it
                return None
            if err.errno in (_errno.ENODEV, _errno.ECONNABORTED, _errno.EBADF):
                raise DeviceGone(f"{self.mode} connection ended: {err.strerror}") from err
            raise
        if n == 0:
            raise DeviceGone(f"{self.mode} connection closed")
        return memoryview(self._buf)[:n]

    def send(self, data: bytes) -> bool:
        """Write one reply; False if it could not be delivered (logged, never raised)."""
        with self._fd_lock:
            if self._fd < 0:
                self.log.debug("reply dropped: device closed")
                return False
            try:
                os.write(self._fd, data)
            except OSError as err:
                level = logging.DEBUG if err.errno == _errno.ENOENT else logging.WARNING
                self.log.log(level, "reply not delivered: %s", err.strerror)
                return False
        return True

    def _set_nonblocking(self) -> None:
        os.set_blocking(self._fd, False)

    def _close_fd(self) -> None:
        with self._fd_lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # --- serving ---------------------------------------------------------------------
    def serve_once(self) -> bool:
        """Read and handle one queued request; False if none was queued."""
        msg = self._read_message()
        if msg is None:
            return False
        try:
            req = proto.decode_request(msg)
        except ProtocolError as err:
            self.log.error("malformed request from the kernel: %s", err)
            return True
        self._dispatch(req)
        return True

    def run(self, stop: threading.Event, *, poll_interval: float = 0.2) -> None:
        """Serve until *stop* is set or the connection ends (DeviceGone propagates)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._fd, selectors.EVENT_READ)
            while not stop.is_set():
                if sel.select(poll_interval):
                    while self.serve_once():
                        pass

    def _dispatch(self, req: Request) -> None:
        op = req.opcode
        self.log.debug("%s unique=%d tid=%d", req.name, req.unique, req.header.pid)
        if op == abi.FUSE_IOCTL:
            self._on_ioctl(req)
        elif op == abi.FUSE_GETATTR:
            self.send(
                proto.encode_attr(
                    req.unique,
                    ino=abi.FUSE_ROOT_ID,
                    mode=_FILE_MODE,
                    mtime=self._mtime,
                    valid_s=ATTR_VALID_S,
                )
            )
        elif op == abi.FUSE_OPEN:
            fh, self._next_fh = self._next_fh, self._next_fh + 1
            # FOPEN_NOFLUSH spares every client's close() a round trip (kernel ≥ 5.16).
            self.send(proto.encode_open(req.unique, fh=fh, open_flags=abi.FOPEN_NOFLUSH))
        elif op in (abi.FUSE_FLUSH, abi.FUSE_RELEASE, abi.FUSE_DESTROY):
            self.send(proto.encode_reply(req.unique))
        elif op == abi.FUSE_STATFS:
            self.send(proto.encode_statfs(req.unique))
        elif op == abi.FUSE_LOOKUP:
            self.send(proto.encode_error(req.unique, _errno.ENOENT))  # a file has no children
        elif op in abi.NO_REPLY_OPCODES or op == abi.FUSE_INTERRUPT:
            pass  # see "Facts we rely on": no reply, or deliberately ignored
        else:
            self.send(proto.encode_error(req.unique, _errno.ENOSYS))

    def _on_ioctl(self, req: Request) -> None:
        raise NotImplementedError

    def _call_handler(self, unique: int, request: HelperRequest) -> None:
        reply = _ReplyOnce(self, unique, request.tid)
        try:
            self._handler(request, reply)
        except RequestRejected as err:
            self.log.warning("tid %d: %s refused: %s", request.tid, request.kind, err.reason)
            if not reply.done:
                reply(-err.errno)
        except Exception:
            self.log.exception("tid %d: handler failed on %s", request.tid, request.kind)
            if not reply.done:
                reply(-_errno.EIO)

    def _refuse(self, unique: int, tid: int, errno: int, reason: str) -> None:
        self.log.warning("tid %d: ioctl refused: %s", tid, reason)
        self.send(proto.encode_error(unique, errno))


def open_device(
    mode: DeviceMode,
    path: str,
    handler: Handler,
    *,
    max_dof_size: int,
    log: logging.Logger | None = None,
    host_ns_pid: int = 1,
) -> HelperDevice:
    """Set up and return the helper device at *path* (absolute).

    ``cuse``: a character device via ``/dev/cuse``; *path* must be under
    ``/dev`` (the device name is the rest).  ``fuse``: a one-file FUSE
    filesystem mounted on *path*, in the mount namespace of *host_ns_pid*
    (see :mod:`dtprobed.mount`).  ``auto``: CUSE when *path* is under ``/dev``
    and ``/dev/cuse`` opens and accepts CUSE_INIT, otherwise FUSE.
    Raises :class:`DeviceError` (fatal) when the chosen mode cannot be set up.
    """
    # The modes import this module, hence the late imports.
    from dtprobed.cuse import CUSE_PATH, CuseDevice, devname_for
    from dtprobed.fusedev import FuseFileDevice

    log = log or logging.getLogger("dtprobed.device")
    if not os.path.isabs(path):
        raise DeviceError(f"helper path {path!r} is not absolute")
    path = os.path.normpath(path)
    if mode == "cuse":
        return CuseDevice.open(path, handler, max_dof_size=max_dof_size, log=log)
    if mode == "auto" and devname_for(path) is not None and os.path.exists(CUSE_PATH):
        try:
            return CuseDevice.open(path, handler, max_dof_size=max_dof_size, log=log)
        except DeviceBusy:
            raise
        except DeviceError as err:
            log.info("CUSE unavailable (%s); using a FUSE file", err)
    elif mode not in ("auto", "fuse"):
        raise DeviceError(f"unknown device mode {mode!r}")
    return FuseFileDevice.open(
        path, handler, max_dof_size=max_dof_size, log=log, host_ns_pid=host_ns_pid
    )
