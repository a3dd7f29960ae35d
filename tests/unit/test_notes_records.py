"""The ELF-notes additions to the common types: Tracepoint.args, ReadAt, ObjectBase, the requests,
their stash form (DOF_PARSED_VERSION 3) and the grammar's optional leading ObjectBase."""

from __future__ import annotations

import msgspec
import pytest

from common.errors import ProtocolError, StashFormatError
from common.grammar import check_stream
from common.limits import MAX_OBJECT_READ, ParseLimits
from common.names import MAX_SARGS_BYTES, NameRefused, check_sargs
from common.records import (
    Eof,
    Err,
    ObjectBase,
    ParserRecord,
    Probe,
    Provider,
    ReadAt,
    ResultRecord,
    Tracepoint,
)
from common.requests import ObjectBytes, ParseNotes, ParserRequest
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


def test_read_at_and_object_base_bounds() -> None:
    dec = msgspec.msgpack.Decoder(ParserRecord)
    assert dec.decode(msgspec.msgpack.encode([101, 0, 1])) == ReadAt(offset=0, size=1)
    assert dec.decode(msgspec.msgpack.encode([101, 2**64 - 1, MAX_OBJECT_READ])) == ReadAt(
        offset=2**64 - 1, size=MAX_OBJECT_READ
    )
    for bad in ([101, 0, 0], [101, 0, MAX_OBJECT_READ + 1], [101, -1, 1], [102, -1]):
        with pytest.raises(msgspec.ValidationError):
            dec.decode(msgspec.msgpack.encode(bad))
    assert dec.decode(msgspec.msgpack.encode([102, 0x7F00])) == ObjectBase(base=0x7F00)
    with pytest.raises(msgspec.ValidationError):  # ReadAt is not a result record
        msgspec.msgpack.Decoder(ResultRecord).decode(msgspec.msgpack.encode([101, 0, 1]))


def test_requests() -> None:
    dec = msgspec.msgpack.Decoder(ParserRequest)
    helper = bytes(80)
    assert dec.decode(msgspec.msgpack.encode([2, helper, 4096])) == ParseNotes(
        helper=helper, size=4096
    )
    assert dec.decode(msgspec.msgpack.encode([3, b"abc"])) == ObjectBytes(data=b"abc")
    for bad in (
        [2, bytes(79), 1],
        [2, helper, -1],
        [2, helper],
        [3, bytes(MAX_OBJECT_READ + 1)],
        [3, "text"],
    ):
        with pytest.raises(msgspec.ValidationError):
            dec.decode(msgspec.msgpack.encode(bad))


def test_limits_defaults_and_bounds() -> None:
    limits = ParseLimits()
    assert (limits.max_object_reads, limits.max_object_bytes) == (64, 64 << 20)
    assert limits.max_object_reads * MAX_OBJECT_READ == limits.max_object_bytes
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"max_object_bytes": 1 << 31}, ParseLimits)


def test_grammar_allows_one_leading_object_base() -> None:
    tp = Tracepoint(addr=1, is_enabled=False, args="")
    probe = Probe(mod="m", fun="f", prb="p", ntp=1, nargc=0, xargc=0)
    stream: list[ResultRecord] = [
        ObjectBase(base=0),
        Provider(name="p", nprobes=1),
        probe,
        tp,
        Eof(),
    ]
    checker = check_stream(stream)
    assert checker.base == ObjectBase(base=0) and len(checker.probes) == 1
    assert check_stream([ObjectBase(base=5), Eof()]).base == ObjectBase(base=5)
    assert check_stream([Eof()]).base is None
    for bad in (
        [ObjectBase(base=0), Err(errno=22, message="x")],
        [ObjectBase(base=0), ObjectBase(base=0), Eof()],
        [Provider(name="p", nprobes=1), ObjectBase(base=0)],
        [Provider(name="p", nprobes=1), probe, tp, ObjectBase(base=0), Eof()],
        [Eof(), ObjectBase(base=0)],
    ):
        with pytest.raises(ProtocolError):
            check_stream(bad)  # type: ignore[arg-type]


def test_object_base_has_no_stash_form() -> None:
    with pytest.raises(TypeError):
        encode_record(ObjectBase(base=0))


def test_grammar_object_base_required_or_forbidden() -> None:
    tp = Tracepoint(addr=1, is_enabled=False, args="")
    probe = Probe(mod="m", fun="f", prb="p", ntp=1, nargc=0, xargc=0)
    body: list[ResultRecord] = [Provider(name="p", nprobes=1), probe, tp, Eof()]
    with_base: list[ResultRecord] = [ObjectBase(base=0), *body]
    check_stream(with_base, object_base=True)
    check_stream(body, object_base=False)
    check_stream([Err(errno=22, message="x")], object_base=True)
    check_stream([Err(errno=22, message="x")], object_base=False)
    with pytest.raises(ProtocolError, match="unexpected Provider"):
        check_stream(body, object_base=True)
    with pytest.raises(ProtocolError, match="unexpected Eof"):
        check_stream([Eof()], object_base=True)
    with pytest.raises(ProtocolError, match="unexpected ObjectBase"):
        check_stream(with_base, object_base=False)
