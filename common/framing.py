"""Length-prefixed msgpack frames for the pipes between the daemon's processes.

A frame is a 4-byte little-endian unsigned length ``n`` followed by ``n`` bytes
of msgpack body.  ``n`` is checked against ``0 < n <= max_size`` *before* any
body byte is read or any buffer reserved; a peer that breaks this, stops in the
middle of a frame, or sends a body that does not decode as the expected type
raises :class:`~common.errors.ProtocolError` — never another exception.

Readers take a ``read_exactly(n)`` callable so this module does no I/O: it
returns exactly ``n`` bytes, or fewer only when the peer closed the pipe.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import msgspec

from common.dof_abi import DOF_MAXSZ
from common.errors import PeerClosed, ProtocolError

HEADER: Final = struct.Struct("<I")
HEADER_SIZE: Final = HEADER.size

#: Largest frame of records (one batch) the parser may send.
MAX_RECORD_FRAME: Final = 1 << 20
#: Largest request frame: a whole DOF plus the helper and msgpack overhead.
MAX_REQUEST_FRAME: Final = DOF_MAXSZ + 4096

T = TypeVar("T")
ReadExactly = Callable[[int], bytes]


#: A buffer grown beyond this by one big frame is dropped after it, not kept for life.
KEEP_BUFFER_BYTES: Final = 1 << 20


class FrameEncoder:
    """Encodes messages into frames, reusing one buffer (build one per stream)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._buf = bytearray(256)

    def encode(self, msg: Any) -> bytes:
        """One frame: header then body."""
        self._encoder.encode_into(msg, self._buf, HEADER_SIZE)
        HEADER.pack_into(self._buf, 0, len(self._buf) - HEADER_SIZE)
        frame = bytes(self._buf)
        if len(frame) > KEEP_BUFFER_BYTES:
            # one hostile request's frame (a 65 KB DOF can decode to 20 MB) would
            # otherwise stay allocated in every process that ever encoded it
            self._buf = bytearray(256)
        return frame


class FrameDecoder(Generic[T]):
    """Reads frames whose body decodes as *type_*, bounded by *max_size*."""

    def __init__(self, type_: type[T] | Any, max_size: int) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type_)
        self.max_size = max_size

    def decode_body(self, body: bytes | memoryview) -> T:
        try:
            return self._decoder.decode(body)
        except (msgspec.DecodeError, UnicodeError) as err:
            raise ProtocolError(f"undecodable frame body: {err}") from err

    def check_length(self, header: bytes | memoryview) -> int:
        (length,) = HEADER.unpack(header)
        if not 0 < length <= self.max_size:
            raise ProtocolError(f"frame length {length} outside 1..{self.max_size}")
        return int(length)

    def read(self, read_exactly: ReadExactly) -> T:
        """Read one frame; :class:`PeerClosed` if the pipe ends before a header."""
        header = read_exactly(HEADER_SIZE)
        if not header:
            raise PeerClosed()
        if len(header) != HEADER_SIZE:
            raise ProtocolError(f"short frame header: {len(header)} of {HEADER_SIZE} bytes")
        length = self.check_length(header)
        body = read_exactly(length)
        if len(body) != length:
            raise ProtocolError(f"short frame body: {len(body)} of {length} bytes")
        return self.decode_body(body)

    def split(self, data: bytes | bytearray | memoryview) -> tuple[list[T], int]:
        """Decode every complete frame at the start of *data*.

        Returns the messages and how many bytes they used; the rest is an
        incomplete frame to be completed by later input.  Every loop iteration
        either consumes a whole frame or stops.
        """
        view = memoryview(data)
        out: list[T] = []
        offset = 0
        while len(view) - offset >= HEADER_SIZE:
            length = self.check_length(view[offset : offset + HEADER_SIZE])
            end = offset + HEADER_SIZE + length
            if end > len(view):
                break
            out.append(self.decode_body(view[offset + HEADER_SIZE : end]))
            offset = end
        return out, offset
