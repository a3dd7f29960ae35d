"""What the FUSE-file and CUSE servers share: read a request, dispatch it, write replies."""

from __future__ import annotations

import errno as _errno
import logging
import os
import selectors
import threading
from typing import TYPE_CHECKING, Final, Literal

from common import fuse_abi as abi
from common.errors import ProtocolError, RequestRejected
from common.ioctl import HelperIoctl, by_value_address, c_int
from dtprobed.device import fuse_proto as proto
from dtprobed.device.errors import DeviceGone
from dtprobed.device.ratelog import RateLog
from dtprobed.device.request import Handler, HelperRequest

if TYPE_CHECKING:
    from dtprobed.device.fuse_proto import Request


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
        #: Refusals are logged per uid at a bounded rate (the daemon may replace it).
        self.ratelog = RateLog(self.log)
        self._buf = bytearray(READ_BUFFER_SIZE)
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
        elif op in (abi.FUSE_OPEN, abi.FUSE_FLUSH):
            # We keep no per-open state.  ENOSYS to the first OPEN makes the kernel
            # open every later file without asking us, and send no RELEASE for any
            # of them (fc->no_open, FUSE and CUSE alike, Linux ≥ 3.14); ENOSYS to
            # the first FLUSH likewise ends FLUSH (fc->no_flush).  A registration
            # is then one request, its IOCTL, instead of three.
            self.send(proto.encode_error(req.unique, _errno.ENOSYS))
        elif op in (abi.FUSE_RELEASE, abi.FUSE_DESTROY):
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
            self.ratelog(
                request.uid,
                logging.WARNING,
                "tid %d: %s refused: %s",
                request.tid,
                request.kind,
                err.reason,
            )
            if not reply.done:
                reply(-err.errno)
        except Exception:
            self.log.exception("tid %d: handler failed on %s", request.tid, request.kind)
            if not reply.done:
                reply(-_errno.EIO)

    def _call_by_value(
        self, unique: int, tid: int, kind: HelperIoctl, arg: int, uid: int = -1
    ) -> None:
        """REMOVE or HASUSDT: everything is in the ioctl's argument, passed by value."""
        if kind == "remove":
            request = HelperRequest(tid, "remove", b"", b"", c_int(arg), uid=uid)
        else:
            request = HelperRequest(tid, "hasusdt", b"", b"", -1, by_value_address(arg), uid=uid)
        self._call_handler(unique, request)

    def _refuse(self, req: Request, errno: int, reason: str) -> None:
        self.ratelog(
            int(req.header.uid),
            logging.WARNING,
            "tid %d: ioctl refused: %s",
            req.header.pid,
            reason,
        )
        self.send(proto.encode_error(req.unique, errno))
