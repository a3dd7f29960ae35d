"""Pure codec for the FUSE/CUSE wire protocol: requests from bytes, replies to bytes.

No I/O here: :mod:`dtprobed.device.fusefile` and :mod:`dtprobed.device.cuse` own the device
fds, the unit tests and the golden samples drive this module directly.

Decoding (:func:`decode_request`) checks what the kernel promises and raises
:class:`common.errors.ProtocolError` when a message breaks it: the header's
``len`` equals the bytes read (one ``read`` returns exactly one request), the
fixed struct of a known opcode fits, and an ioctl's ``in_size`` equals the
payload that follows.  Request extensions (``total_extlen``, e.g. security
contexts on CREATE) are split off and never interpreted.

Encoding: one function per reply shape.  ``fuse_out_header.error`` is 0 or a
negative errno; the kernel refuses anything ≤ -512 or > 0 with EINVAL on the
write, so :func:`encode_error` checks the range first.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from typing import Any, Final

from common import fuse_abi as abi
from common.errors import ProtocolError

_MAX_ERRNO: Final = 511


@dataclass(frozen=True)
class Request:
    """One decoded request.

    ``header`` is a ``fuse_in_header`` tuple; ``args`` the opcode's fixed struct
    (``None`` when the opcode has none we decode); ``payload`` whatever follows
    it (an ioctl's client data, a LOOKUP name, a BATCH_FORGET list), without
    extensions.
    """

    header: Any
    args: Any
    payload: bytes

    @property
    def opcode(self) -> int:
        return int(self.header.opcode)

    @property
    def unique(self) -> int:
        return int(self.header.unique)

    @property
    def name(self) -> str:
        return abi.OPCODE_NAMES.get(self.opcode, f"opcode {self.opcode}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view (golden samples, debug logs)."""
        return {
            "opcode": self.name,
            "header": self.header._asdict(),
            "args": None if self.args is None else self.args._asdict(),
            "payload": self.payload.hex(),
        }


def decode_request(buf: bytes | bytearray | memoryview) -> Request:
    """Decode one message read from the device; raise ProtocolError if it is malformed."""
    view = memoryview(buf)
    if len(view) < abi.FUSE_IN_HEADER.size:
        raise ProtocolError(f"short FUSE message: {len(view)} bytes")
    header = abi.FUSE_IN_HEADER.unpack_from(view)
    if header.len != len(view):
        raise ProtocolError(f"FUSE header says {header.len} bytes, read {len(view)}")
    end = len(view) - 8 * header.total_extlen
    if end < abi.FUSE_IN_HEADER.size:
        raise ProtocolError(f"FUSE extensions ({header.total_extlen} × 8) exceed the message")
    body = view[abi.FUSE_IN_HEADER.size : end]
    layout = abi.REQUEST_LAYOUTS.get(header.opcode)
    args: Any = None
    if layout is not None:
        need = layout.size
        if header.opcode == abi.FUSE_INIT:
            need = abi.FUSE_COMPAT_INIT_IN_SIZE
            body = _pad(body, layout.size)
        if len(body) < need:
            raise ProtocolError(
                f"{abi.OPCODE_NAMES[header.opcode]}: body of {len(body)} bytes, need {need}"
            )
        args = layout.unpack_from(body)
        body = body[layout.size :]
    if header.opcode == abi.FUSE_IOCTL and args.in_size != len(body):
        raise ProtocolError(f"FUSE_IOCTL: in_size {args.in_size} but {len(body)} bytes follow")
    return Request(header, args, bytes(body))


def _pad(body: memoryview, size: int) -> memoryview:
    """Older kernels send a shorter fuse_init_in; missing fields read as zero."""
    if len(body) >= size:
        return body
    return memoryview(bytes(body) + bytes(size - len(body)))


def batch_forget_entries(req: Request) -> list[tuple[int, int]]:
    """The (nodeid, nlookup) pairs of a BATCH_FORGET (bounded by the payload)."""
    one = abi.FUSE_FORGET_ONE
    count = min(req.args.count, len(req.payload) // one.size)
    return [tuple(one.unpack_from(req.payload, i * one.size)) for i in range(count)]


# --- replies ---------------------------------------------------------------------------


def encode_reply(unique: int, body: bytes = b"") -> bytes:
    """A successful reply: out header (error 0) then *body*."""
    size = abi.FUSE_OUT_HEADER.size + len(body)
    return abi.FUSE_OUT_HEADER.pack(size, 0, unique) + body


def encode_error(unique: int, errno: int) -> bytes:
    """An error reply (``fuse_reply_err``): *errno* is positive, sent negated."""
    if not 0 < errno <= _MAX_ERRNO:
        raise ValueError(f"errno {errno} out of the range the kernel accepts")
    return abi.FUSE_OUT_HEADER.pack(abi.FUSE_OUT_HEADER.size, -errno, unique)


def encode_init(
    unique: int, *, minor: int, max_readahead: int, max_write: int, flags: int = 0
) -> bytes:
    """FUSE_INIT reply: no optional features, a small max_write (we serve no writes)."""
    return encode_reply(
        unique,
        abi.FUSE_INIT_OUT.pack(
            abi.FUSE_KERNEL_VERSION, minor, max_readahead, flags, 0, 0, max_write, 1, 0, 0, 0
        ),
    )


def encode_cuse_init(
    unique: int, *, minor: int, flags: int, max_read: int, max_write: int, devname: str
) -> bytes:
    """CUSE_INIT reply: ``cuse_init_out`` then the NUL-terminated ``DEVNAME=...`` info."""
    info = f"DEVNAME={devname}".encode() + b"\0"
    if len(info) > abi.CUSE_INIT_INFO_MAX:
        raise ValueError("CUSE device name too long")
    out = abi.CUSE_INIT_OUT.pack(abi.FUSE_KERNEL_VERSION, minor, flags, max_read, max_write, 0, 0)
    return encode_reply(unique, out + info)


def _attr(ino: int, mode: int, mtime: int) -> tuple[int, ...]:
    # ino, size, blocks, atime, mtime, ctime, *nsec, mode, nlink, uid, gid, rdev, blksize, flags
    return (ino, 0, 0, mtime, mtime, mtime, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)


def encode_attr(unique: int, *, ino: int, mode: int, mtime: int, valid_s: int) -> bytes:
    """GETATTR reply for our one file (owner root:root, size 0)."""
    return encode_reply(unique, abi.FUSE_ATTR_OUT.pack(valid_s, 0, *_attr(ino, mode, mtime)))


def encode_open(unique: int, *, fh: int, open_flags: int) -> bytes:
    return encode_reply(unique, abi.FUSE_OPEN_OUT.pack(fh, open_flags))


def encode_statfs(unique: int) -> bytes:
    """STATFS reply: an empty filesystem with 255-byte names."""
    return encode_reply(unique, abi.FUSE_KSTATFS.pack(0, 0, 0, 1, 0, 512, 255, 512))


def encode_ioctl(unique: int, result: int) -> bytes:
    """Final ioctl reply: the ioctl returns *result* (≥ 0), no data copied out."""
    if not 0 <= result < 2**31:
        raise ValueError(f"ioctl result {result} is not a non-negative int")
    return encode_reply(unique, abi.FUSE_IOCTL_OUT.pack(result, 0, 0, 0))


def encode_ioctl_retry(unique: int, in_iovs: list[tuple[int, int]]) -> bytes:
    """Ask the kernel to re-send the ioctl with these client ranges copied in.

    Only unrestricted ioctls (CUSE) may retry; the kernel answers a retry of a
    restricted one with EIO.  The iovec array is the reply's data and must be
    exactly ``(in_iovs + out_iovs) × 16`` bytes.
    """
    if not 0 < len(in_iovs) <= abi.FUSE_IOCTL_MAX_IOV:
        raise ValueError("retry needs 1..FUSE_IOCTL_MAX_IOV iovecs")
    out = abi.FUSE_IOCTL_OUT.pack(0, abi.FUSE_IOCTL_RETRY, len(in_iovs), 0)
    iovs = b"".join(abi.FUSE_IOCTL_IOVEC.pack(base, size) for base, size in in_iovs)
    return encode_reply(unique, out + iovs)


def errno_name(errno: int) -> str:
    return _errno.errorcode.get(errno, str(errno))
