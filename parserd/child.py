"""The parser child's request loop: request frames in on fd 0, record batches out on fd 1.

Protocol (``docs/protocol.md``, "Parser protocol"): each request is one frame
whose body is a msgpack ``ParseRequest``; the answer is one or more frames
whose body is a msgpack array (a batch) of records, each frame at most
:data:`~common.framing.MAX_RECORD_FRAME` bytes of body.  The stream of one
request ends with exactly one ``Eof`` or ``Err``.  ``Log`` records may come
before it.

A ``LocateNotes`` request is an exchange: while it locates the notes, the
child sends batches ending in one ``ReadAt`` and reads exactly one
``ObjectBytes`` frame (bounded by :data:`~common.limits.MAX_OBJECT_READ`) on
fd 0 for each; the same two fds, so the seccomp allowlist needs nothing new.
Its answer is one ``NotesLocation`` or one ``Err``.  Anything else in answer
to a ``ReadAt``, or an ``ObjectBytes`` as a request, is a protocol error
(exit :data:`EXIT_PROTOCOL`).  A ``ParseNoteBlocks`` carries the two blocks
in its frame and is answered like a ``ParseRequest``, with no ``ReadAt``.

The child never logs by itself (``logging`` would call ``getpid`` and write to
stderr, both forbidden): it sends ``Log`` records.  It leaves only with
``os._exit``: 0 when fd 0 reaches EOF between requests (the host closed the
pipe) or the host stopped reading; :data:`EXIT_PROTOCOL` when the host broke
the framing; :data:`EXIT_INTERNAL` when the parser raised, which its contract
forbids — the host then sees a child failure, and the fuzz harness a finding.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from typing import Any, Final, NoReturn

import msgspec

from common.dof_abi import DOF_HELPER
from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from common.errors import ProtocolError
from common.framing import HEADER, HEADER_SIZE, MAX_RECORD_FRAME, FrameDecoder
from common.limits import MAX_OBJECT_READ, ParseLimits
from common.notes_build import warm_up_objects
from common.records import MAX_MESSAGE, Log, NotesLocation, ParserRecord, ReadAt, ResultRecord
from common.requests import (
    LocateNotes,
    ObjectBytes,
    ParseNoteBlocks,
    ParseRequest,
    ParserRequest,
)
from parserd.allowlist import RECORD_FD, REQUEST_FD
from parserd.dof_parse import parse_dof
from parserd.elf_notes import locate_notes, parse_note_blocks

EXIT_PROTOCOL: Final = 65  # EX_DATAERR: the host sent a bad frame
EXIT_INTERNAL: Final = 70  # EX_SOFTWARE: the parser raised (a bug)


def _warm_up_dofs() -> list[bytes]:
    """DOF that reach the parser's accept path (every record kind) and its reject paths."""
    probe = ProbeSpec(
        func="f", name="p", offsets=[8, 4], enoffsets=[2], native=["int", "char *"],
        xlat=["long"], argmap=[1],
    )  # fmt: skip
    valid = build_dof([ProviderSpec("warm", [probe], relocate=True)]).data
    corrupt = bytearray(valid)
    corrupt[0] = 0  # bad magic
    return [valid, bytes(corrupt), valid[:63], b""]


def _describe(exc: BaseException) -> str:
    """Type, message and the frames' (file, line, function), without reading any source.

    ``traceback.format_exception`` opens the source files through linecache,
    which the filter forbids.
    """
    parts = [f"{type(exc).__name__}: {exc}"]
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        parts.append(f"{os.path.basename(code.co_filename)}:{tb.tb_lineno} {code.co_name}")
        tb = tb.tb_next
    return " < ".join(parts)[:MAX_MESSAGE]


class ChildLoop:
    """Codecs and buffers built once, before the lock; :meth:`serve` runs under it."""

    def __init__(self, limits: ParseLimits) -> None:
        self.limits = limits
        # a DOF, or the two blocks of a ParseNoteBlocks (at most max_object_bytes together)
        self._requests: FrameDecoder[ParserRequest] = FrameDecoder(
            ParserRequest, max(limits.max_dof_size, limits.max_object_bytes) + 4096
        )
        self._object_bytes: FrameDecoder[ObjectBytes] = FrameDecoder(
            ObjectBytes, MAX_OBJECT_READ + 64
        )
        #: in warm-up, ReadAt is answered from this object instead of the pipes
        self._warm_object: bytes | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._out = bytearray(64 * 1024)
        # FileIO.readinto is one read(2) into our buffer: no extra copy, no readv.
        self._stdin = io.FileIO(REQUEST_FD, "rb", closefd=False)

    # --- output ---------------------------------------------------------------
    def _append_batch(self, batch: Sequence[ParserRecord]) -> None:
        start = len(self._out)
        self._out.extend(b"\0\0\0\0")
        self._encoder.encode_into(batch, self._out, start + HEADER_SIZE)
        HEADER.pack_into(self._out, start, len(self._out) - start - HEADER_SIZE)

    def encode_answer(self, records: list[ResultRecord], logs: list[Log] | None = None) -> bytes:
        """All frames of one answer, concatenated (so it can leave in one write)."""
        self._out.clear()
        if logs:
            self._append_batch(logs)
        start, n = 0, len(records)
        while start < n:
            count = n - start
            while True:
                mark = len(self._out)
                self._append_batch(records[start : start + count])
                size = len(self._out) - mark - HEADER_SIZE
                if size <= MAX_RECORD_FRAME:
                    break
                del self._out[mark:]
                if count == 1:  # no record comes near 1 MiB; the parser broke a bound
                    raise ValueError(f"one record encodes to {size} bytes")
                # shrink in proportion, with a margin, so this converges in a step or two
                count = max(1, count * MAX_RECORD_FRAME * 9 // (size * 10))
            start += count
        return bytes(self._out)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(RECORD_FD, view)
            except InterruptedError:
                continue
            except BrokenPipeError:
                os._exit(0)  # the host stopped reading: it is gone or restarting us
            view = view[written:]

    def log(self, level: int, message: str) -> None:
        self.send(self.encode_answer([], [Log(level=level, message=message[:MAX_MESSAGE])]))

    # --- input ----------------------------------------------------------------
    def _read_into(self, view: memoryview) -> int:
        """Fill *view*; returns how many bytes arrived before EOF."""
        got = 0
        while got < len(view):
            try:
                n = self._stdin.readinto(view[got:])
            except InterruptedError:
                continue
            if not n:
                break
            got += n
        return got

    def _read_frame(self, decoder: FrameDecoder[Any], what: str) -> Any:
        header = bytearray(HEADER_SIZE)
        got = self._read_into(memoryview(header))
        if got == 0:
            return None
        if got != HEADER_SIZE:
            raise ProtocolError(f"short {what} header: {got} of {HEADER_SIZE} bytes")
        length = decoder.check_length(memoryview(header))
        body = bytearray(length)
        got = self._read_into(memoryview(body))
        if got != length:
            raise ProtocolError(f"short {what} body: {got} of {length} bytes")
        return decoder.decode_body(memoryview(body))

    def read_request(self) -> ParserRequest | None:
        """The next request; None at EOF between requests; ProtocolError otherwise."""
        request: ParserRequest | None = self._read_frame(self._requests, "request")
        if isinstance(request, ObjectBytes):
            raise ProtocolError("ObjectBytes frame without a ReadAt")
        return request

    def read_object(self, offset: int, size: int) -> bytes:
        """One ReadAt / ObjectBytes round trip (the notes parser's ``read``)."""
        if self._warm_object is not None:
            data = self._warm_object[offset : offset + size]
            self._encode_read_at(offset, size)  # the real path, minus the pipes
            frame = self._encoder.encode(ObjectBytes(data=data))
            return self._object_bytes.decode_body(frame).data
        self.send(self._encode_read_at(offset, size))
        answer: ObjectBytes | None = self._read_frame(self._object_bytes, "object bytes")
        if answer is None:
            raise ProtocolError(f"request pipe closed while waiting for ReadAt({offset}, {size})")
        if len(answer.data) > size:
            raise ProtocolError(f"ObjectBytes of {len(answer.data)} bytes for a ReadAt of {size}")
        return answer.data

    def _encode_read_at(self, offset: int, size: int) -> bytes:
        self._out.clear()
        self._append_batch([ReadAt(offset=offset, size=size)])
        return bytes(self._out)

    # --- the loop -------------------------------------------------------------
    def answer(self, request: ParserRequest) -> bytes:
        if isinstance(request, LocateNotes):
            records = locate_notes(
                request.helper, request.size, self.read_object, self.limits, dof=request.dof
            )
            return self.encode_answer(records)
        if isinstance(request, ParseNoteBlocks):
            records = parse_note_blocks(
                request.helper,
                request.notes_addr,
                request.notes,
                request.rodata_addr,
                request.rodata,
                self.limits,
            )
            return self.encode_answer(records)
        assert isinstance(request, ParseRequest)  # read_request refuses ObjectBytes
        return self.encode_answer(parse_dof(request.helper, request.dof, self.limits))

    def warm_up(self) -> None:
        """Run every code path once before the lock: decode error, parse, encode."""
        with contextlib.suppress(ProtocolError):
            self._requests.decode_body(b"\xc1")  # 0xc1 is never valid msgpack
        helper = DOF_HELPER.pack(b"a.out", 0, 0)
        for dof in _warm_up_dofs():
            frame = self._encoder.encode(ParseRequest(helper=helper, dof=dof))
            self.answer(self._requests.decode_body(frame))
        notes_helper = DOF_HELPER.pack(b"warm.so", 0x7F0000000000, 0)
        for obj in warm_up_objects():
            for want_dof in (False, True):  # catch-up's locate (dof) too
                frame = self._encoder.encode(
                    LocateNotes(helper=notes_helper, size=len(obj), dof=want_dof)
                )
                self._warm_object = obj
                try:
                    self.answer(self._requests.decode_body(frame))
                finally:
                    self._warm_object = None
            for loc in self._warm_locations(obj, notes_helper):
                blocks = ParseNoteBlocks(
                    helper=DOF_HELPER.pack(b"warm.so", loc.base, 0),
                    notes_addr=loc.notes_addr,
                    notes=obj[loc.notes_offset : loc.notes_offset + loc.notes_size],
                    rodata_addr=loc.rodata_addr,
                    rodata=obj[loc.rodata_offset : loc.rodata_offset + loc.rodata_size],
                )
                self.answer(self._requests.decode_body(self._encoder.encode(blocks)))
        with contextlib.suppress(ProtocolError):
            self._object_bytes.decode_body(b"\xc1")
        _describe(ValueError("warm-up"))
        try:
            raise ProtocolError("warm-up")
        except ProtocolError as err:
            _describe(err)

    def _warm_locations(self, obj: bytes, helper: bytes) -> list[NotesLocation]:
        """The warm-up object's location, as the pure function finds it (no pipes)."""
        records = locate_notes(helper, len(obj), lambda o, n: obj[o : o + n], self.limits)
        return [r for r in records if isinstance(r, NotesLocation)]

    def serve(self) -> NoReturn:
        while True:
            try:
                request = self.read_request()
            except ProtocolError as err:
                self.log(logging.ERROR, f"bad request from the host, exiting: {err}")
                os._exit(EXIT_PROTOCOL)
            if request is None:
                os._exit(0)
            try:
                data = self.answer(request)
            except ProtocolError as err:  # the host broke the ReadAt exchange
                del request
                self.log(logging.ERROR, f"bad object bytes from the host, exiting: {err}")
                os._exit(EXIT_PROTOCOL)
            except Exception as err:  # the parsers' contract is never to raise
                del request
                self.log(logging.CRITICAL, f"internal parser error: {_describe(err)}")
                os._exit(EXIT_INTERNAL)
            del request  # the DOF may be large; free it before the write blocks
            self.send(data)
