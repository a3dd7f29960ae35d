"""Frames: bounded before reading, every failure a ProtocolError."""

from __future__ import annotations

import io
import os

import msgspec
import pytest

from common.errors import PeerClosed, ProtocolError
from common.framing import HEADER, FrameDecoder, FrameEncoder
from common.records import Eof, ParserRecord, Probe, Provider


def reader(data: bytes):  # type: ignore[no-untyped-def]
    stream = io.BytesIO(data)
    return stream.read


BATCH = [Provider(name="p", nprobes=1), Probe(mod="m", fun="f", prb="x", ntp=1, nargc=0, xargc=0)]


def test_roundtrip_through_a_real_pipe() -> None:
    enc = FrameEncoder()
    dec: FrameDecoder[list[ParserRecord]] = FrameDecoder(list[ParserRecord], 1 << 20)
    r, w = os.pipe()
    with os.fdopen(r, "rb") as rf, os.fdopen(w, "wb") as wf:
        wf.write(enc.encode(BATCH) + enc.encode([Eof()]))
        wf.close()
        assert dec.read(rf.read) == BATCH
        assert dec.read(rf.read) == [Eof()]
        with pytest.raises(PeerClosed):
            dec.read(rf.read)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (HEADER.pack(0), "frame length 0 outside"),
        (HEADER.pack(1 << 21), "frame length 2097152 outside"),
        (b"\x01\x00", "short frame header"),
        (HEADER.pack(10) + b"abc", "short frame body"),
        (HEADER.pack(1) + b"\xc1", "undecodable"),  # 0xc1 is never valid msgpack
    ],
)
def test_bad_frames(data: bytes, message: str) -> None:
    dec: FrameDecoder[list[ParserRecord]] = FrameDecoder(list[ParserRecord], 1 << 20)
    with pytest.raises(ProtocolError, match=message):
        dec.read(reader(data))


def test_schema_violations_are_protocol_errors() -> None:
    enc = FrameEncoder()
    dec: FrameDecoder[list[ParserRecord]] = FrameDecoder(list[ParserRecord], 1 << 20)
    for bad in ([[0, "../x", 1]], [[0, "ok", -1]], [[99]], [[1, "m", "f", "p", 0, 0, 0]]):
        with pytest.raises(ProtocolError):
            dec.read(reader(enc.encode(bad)))
    invalid_utf8 = HEADER.pack(5) + b"\x91\x92\x00\xa1\xff"  # [[0, "\xff"]]
    with pytest.raises(ProtocolError):
        dec.read(reader(invalid_utf8))


def test_split_consumes_whole_frames_only() -> None:
    enc = FrameEncoder()
    dec: FrameDecoder[list[ParserRecord]] = FrameDecoder(list[ParserRecord], 1 << 20)
    data = enc.encode(BATCH) + enc.encode([Eof()])
    msgs, used = dec.split(data[:-1])
    assert msgs == [BATCH] and used == len(enc.encode(BATCH))
    msgs, used = dec.split(data)
    assert msgs == [BATCH, [Eof()]] and used == len(data)


def test_the_examples_in_docs_protocol_md() -> None:
    """The hex examples docs/protocol.md gives are the bytes we send."""
    from common.framing import FrameEncoder
    from common.records import Eof, Provider, Tracepoint

    enc = msgspec.msgpack.encode
    assert FrameEncoder().encode([Eof()]) == bytes.fromhex("03000000 919104")
    assert enc(Provider(name="feasprov", nprobes=3)) == bytes.fromhex("9300a8 6665617370726f76 03")
    assert enc(Tracepoint(addr=0x401000, is_enabled=False)) == bytes.fromhex("9402ce00401000c2c0")
    notes_tp = Tracepoint(addr=0x401000, is_enabled=False, args="-4@%edi")
    assert enc(notes_tp) == bytes.fromhex("9402ce00401000c2 a7 2d34402565646 9".replace(" ", ""))
