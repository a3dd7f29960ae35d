"""The ELF-notes additions to the common types: Tracepoint.args, ReadAt, NotesLocation, the
requests (LocateNotes, ObjectBytes, ParseNoteBlocks), their stash form (DOF_PARSED_VERSION 3)
and the notes grammar (unique tracepoint addresses in any order)."""

from __future__ import annotations

import msgspec
import pytest

from common.dof_abi import DOF_MAXSZ
from common.errors import ProtocolError, StashFormatError
from common.framing import MAX_REQUEST_FRAME
from common.grammar import check_location, check_stream
from common.limits import MAX_OBJECT_BYTES, MAX_OBJECT_READ, MAX_OBJECT_SIZE, ParseLimits
from common.names import MAX_SARGS_BYTES, NameRefused, check_sargs
from common.records import (
    Eof,
    Err,
    NotesLocation,
    ParserRecord,
    Probe,
    Provider,
    ReadAt,
    ResultRecord,
    Tracepoint,
)
from common.requests import (
    MAX_NOTE_BLOCK,
    LocateNotes,
    ObjectBytes,
    ParseNoteBlocks,
    ParserRequest,
)
from common.stash_format import decode_probe_file, decode_records, encode_probe_file, encode_record

PROVIDER = Provider(name="prv", nprobes=1)
PROBE = Probe(mod="libx.so", fun="main", prb="go", ntp=2, nargc=1, xargc=0)


def test_tracepoint_args_is_appended_with_a_default() -> None:
    """Schema evolution: an old two-item Tracepoint still decodes (args None)."""
    dec = msgspec.msgpack.Decoder(ParserRecord)
    assert dec.decode(msgspec.msgpack.encode([2, 0x1000, False])) == Tracepoint(
        addr=0x1000, is_enabled=False
    )
    # the encoder writes all items: a DOF tracepoint carries a trailing nil
    dof_tp = Tracepoint(addr=0x401000, is_enabled=False)
    assert msgspec.msgpack.encode(dof_tp).hex() == "9402ce00401000c2c0"
    tp = Tracepoint(addr=1, is_enabled=True, args="-4@%edi")
    assert msgspec.msgpack.encode(tp) == msgspec.msgpack.encode([2, 1, True, "-4@%edi"])
    assert dec.decode(msgspec.msgpack.encode(tp)) == tp


@pytest.mark.parametrize(
    ("args", "size"),
    [("", 29), ("-4@%edi", 36), ("x" * 19, 48), ("-4@%edi -8@%rsi 4@%edx", 28 + 22 + 1)],
)
def test_notes_tracepoint_stash_form(args: str, size: int) -> None:
    tp = Tracepoint(addr=0x7F00_0000_1000, is_enabled=False, args=args)
    raw = encode_record(tp)
    assert len(raw) == size == int.from_bytes(raw[:8], "little")
    assert raw[8:16] == b"\x02\0\0\0\0\0\0\0"
    assert raw[16:24] == (0x7F00_0000_1000).to_bytes(8, "little")
    assert raw[24:28] == b"\0\0\0\0"
    assert raw[28:] == args.encode() + b"\0"
    assert decode_records(raw) == [tp]


def test_dof_tracepoint_stash_form_is_unchanged() -> None:
    tp = Tracepoint(addr=0x401136, is_enabled=True)
    raw = encode_record(tp)
    assert len(raw) == 48 and raw[28:] == bytes(20)
    assert decode_records(raw) == [tp]


@pytest.mark.parametrize(
    "payload",
    [b"abc", b"a\0b\0", b"\xff\0", b"a\x01\0"],
)
def test_bad_tracepoint_payloads_are_refused(payload: bytes) -> None:
    raw = (28 + len(payload)).to_bytes(8, "little") + b"\x02" + bytes(7) + bytes(12) + payload
    with pytest.raises(StashFormatError):
        decode_records(raw)


def test_probe_file_with_notes_tracepoints_round_trips() -> None:
    from common.records import ArgsNative

    tps = [
        Tracepoint(addr=0x10, is_enabled=False, args="-4@%edi"),
        Tracepoint(addr=0x20, is_enabled=True, args="8@%rax"),
    ]
    data = encode_probe_file(PROVIDER, PROBE, [ArgsNative(args=["int"])], tps)
    f = decode_probe_file(data)
    assert f.tracepoints == tps and f.probe == PROBE


def test_sargs_policy() -> None:
    check_sargs("")
    check_sargs("-4@%edi -8@-24(%rbp)")
    check_sargs("é" * (MAX_SARGS_BYTES // 2))
    for bad in ("a\nb", "\x7f", "\x00"):
        with pytest.raises(NameRefused, match="forbidden character"):
            check_sargs(bad)
    with pytest.raises(NameRefused, match="too long: 4098 bytes > 4096"):
        check_sargs("é" * 2049)
    with pytest.raises(ValueError, match="forbidden character"):
        Tracepoint(addr=1, is_enabled=False, args="a\tb")
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.Decoder(ParserRecord).decode(
            msgspec.msgpack.encode([2, 1, False, "x" * 5000])
        )


LOCATION = NotesLocation(
    base=0x7F00, notes_addr=0x300, notes_offset=0x300, notes_size=0x40, rodata_addr=0x2000,
    rodata_offset=0x2000, rodata_size=0x100,
)  # fmt: skip


def test_read_at_and_notes_location_bounds() -> None:
    dec = msgspec.msgpack.Decoder(ParserRecord)
    assert dec.decode(msgspec.msgpack.encode([101, 0, 1])) == ReadAt(offset=0, size=1)
    assert dec.decode(msgspec.msgpack.encode([101, 2**64 - 1, MAX_OBJECT_READ])) == ReadAt(
        offset=2**64 - 1, size=MAX_OBJECT_READ
    )
    for bad in ([101, 0, 0], [101, 0, MAX_OBJECT_READ + 1], [101, -1, 1]):
        with pytest.raises(msgspec.ValidationError):
            dec.decode(msgspec.msgpack.encode(bad))
    wire = [102, 0x7F00, 0x300, 0x300, 0x40, 0x2000, 0x2000, 0x100]
    # catch-up's fields come after, with defaults: the older 8-item form still decodes
    assert msgspec.msgpack.encode(LOCATION) == msgspec.msgpack.encode([*wire, 0, 0, True])
    assert dec.decode(msgspec.msgpack.encode(wire)) == LOCATION
    dof_only = dec.decode(msgspec.msgpack.encode([102, 0x7F00, 0, 0, 0, 0, 0, 0, 0x40, 8, False]))
    assert (dof_only.dof_addr, dof_only.dof_size, dof_only.notes_found) == (0x40, 8, False)
    for bad_dof in (
        [102, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, False],  # neither located
        [102, 0, 0, 0, 0, 0, 0, 0, 0x40, DOF_MAXSZ + 1, False],
    ):
        with pytest.raises(msgspec.ValidationError):
            dec.decode(msgspec.msgpack.encode(bad_dof))
    top = 2**64 - 1
    assert dec.decode(msgspec.msgpack.encode([102, top, top, 0, 0, top, 0, 0])).base == top
    for bad in (
        [102, -1, 0, 0, 0, 0, 0, 0],
        [102, 0, 0, 0, 0, 0, 0],  # a field short
        [102, 0, 0, MAX_OBJECT_SIZE + 1, 0, 0, 0, 0],  # offsets: u63
        [102, 0, 0, MAX_OBJECT_SIZE, 1, 0, 0, 0],  # the block past the largest file
        [102, 0, 0, 0, 0, 0, MAX_OBJECT_SIZE, 1],
        [102, 0, 0, 0, MAX_OBJECT_BYTES + 1, 0, 0, 0],  # sizes: at most MAX_OBJECT_BYTES
        [102, 0, 0, 0, MAX_OBJECT_BYTES, 0, 0, 1],  # ... together
    ):
        with pytest.raises(msgspec.ValidationError):
            dec.decode(msgspec.msgpack.encode(bad))
    with pytest.raises(msgspec.ValidationError):  # ReadAt is not a result record
        msgspec.msgpack.Decoder(ResultRecord).decode(msgspec.msgpack.encode([101, 0, 1]))
    assert msgspec.msgpack.Decoder(ResultRecord).decode(msgspec.msgpack.encode(wire)) == LOCATION


def test_requests() -> None:
    dec = msgspec.msgpack.Decoder(ParserRequest)
    helper = bytes(80)
    assert dec.decode(msgspec.msgpack.encode([2, helper, 4096])) == LocateNotes(
        helper=helper, size=4096
    )
    assert dec.decode(msgspec.msgpack.encode([3, b"abc"])) == ObjectBytes(data=b"abc")
    blocks = ParseNoteBlocks(helper=helper, notes_addr=0x300, notes=b"n", rodata_addr=0x2000,
                             rodata=b"r")  # fmt: skip
    wire = [4, helper, 0x300, b"n", 0x2000, b"r"]
    assert msgspec.msgpack.encode(blocks) == msgspec.msgpack.encode(wire)
    assert dec.decode(msgspec.msgpack.encode(wire)) == blocks
    for bad in (
        [2, bytes(79), 1],
        [2, helper, -1],
        [2, helper, 1 << 63],
        [2, helper],
        [3, bytes(MAX_OBJECT_READ + 1)],
        [3, "text"],
        [4, helper, 0, b"", 0],
        [4, bytes(81), 0, b"", 0, b""],
        [4, helper, -1, b"", 0, b""],
        [4, helper, 0, "text", 0, b""],
        [5, helper],
    ):
        with pytest.raises(msgspec.ValidationError):
            dec.decode(msgspec.msgpack.encode(bad))


def test_block_bounds_fit_one_request_frame() -> None:
    assert MAX_NOTE_BLOCK == MAX_OBJECT_BYTES
    # the largest accepted pair of blocks, with its helper and msgpack overhead, fits a frame
    overhead = len(msgspec.msgpack.encode(ParseNoteBlocks(helper=bytes(80), notes_addr=2**64 - 1,
                                                          notes=b"", rodata_addr=2**64 - 1,
                                                          rodata=b"")))  # fmt: skip
    assert MAX_OBJECT_BYTES + overhead + 8 <= MAX_REQUEST_FRAME
    dec = msgspec.msgpack.Decoder(ParserRequest)
    too_big = msgspec.msgpack.encode([4, bytes(80), 0, bytes(MAX_NOTE_BLOCK + 1), 0, b""])
    with pytest.raises(msgspec.ValidationError):
        dec.decode(too_big)


def test_limits_defaults_and_bounds() -> None:
    limits = ParseLimits()
    assert (limits.max_object_reads, limits.max_object_bytes) == (64, 64 << 20)
    assert limits.max_object_reads * MAX_OBJECT_READ == limits.max_object_bytes
    assert msgspec.convert({"max_object_bytes": MAX_OBJECT_BYTES}, ParseLimits)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"max_object_bytes": MAX_OBJECT_BYTES + 1}, ParseLimits)


def test_notes_location_has_no_stash_form() -> None:
    with pytest.raises(TypeError):
        encode_record(LOCATION)


def test_check_location() -> None:
    assert check_location([LOCATION]) == LOCATION
    assert check_location([Err(errno=22, message="x")]) == Err(errno=22, message="x")
    for bad in (
        [],
        [Eof()],
        [LOCATION, LOCATION],
        [LOCATION, Eof()],
        [Provider(name="p", nprobes=0)],
    ):
        with pytest.raises(ProtocolError, match="expected one NotesLocation or Err"):
            check_location(bad)  # type: ignore[arg-type]


def _probe(*tps: Tracepoint) -> list[ResultRecord]:
    probe = Probe(mod="m", fun="f", prb="p", ntp=len(tps), nargc=0, xargc=0)
    return [Provider(name="p", nprobes=1), probe, *tps, Eof()]


def test_notes_grammar_wants_unique_addresses_in_any_order() -> None:
    def tp(addr: int, en: bool = False) -> Tracepoint:
        return Tracepoint(addr=addr, is_enabled=en, args="")

    upstream_order = _probe(tp(0x18, True), tp(0x30), tp(0x10))
    assert len(check_stream(upstream_order, notes=True).probes) == 1
    with pytest.raises(ProtocolError, match="regular tracepoint after an is-enabled one"):
        check_stream(upstream_order)  # DOF's rule is the default
    with pytest.raises(ProtocolError, match="regular tracepoint after an is-enabled one"):
        check_stream(upstream_order, notes=False)
    check_stream(_probe(tp(0x10), tp(0x30), tp(0x18, True)), notes=False)
    for dup in (_probe(tp(0x10), tp(0x10)), _probe(tp(0x10), tp(0x10, True)),
                _probe(tp(0x10, True), tp(0x20), tp(0x10, True))):  # fmt: skip
        with pytest.raises(ProtocolError, match="tracepoint 0x10 appears twice in one probe"):
            check_stream(dup, notes=True)
    # addresses are unique per probe, not per stream
    two: list[ResultRecord] = [Provider(name="p", nprobes=2),
           Probe(mod="m", fun="f", prb="a", ntp=1, nargc=0, xargc=0), tp(0x10),
           Probe(mod="m", fun="f", prb="b", ntp=1, nargc=0, xargc=0), tp(0x10), Eof()]  # fmt: skip
    assert len(check_stream(two, notes=True).probes) == 2


def test_no_stream_takes_a_notes_location() -> None:
    body = _probe(Tracepoint(addr=1, is_enabled=False, args=""))
    for notes in (False, True):
        check_stream(body, notes=notes)
        check_stream([Err(errno=22, message="x")], notes=notes)
        bads: list[list[ResultRecord]] = [[LOCATION, *body], [LOCATION], [*body[:-1], LOCATION]]
        for bad in bads:
            with pytest.raises(ProtocolError, match="unexpected NotesLocation"):
                check_stream(bad, notes=notes)
