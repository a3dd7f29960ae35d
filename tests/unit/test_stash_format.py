"""The C layout of parsed records, checked against upstream's worked example (reference §4.4)."""

from __future__ import annotations

import pytest

from common.errors import StashFormatError
from common.records import ArgsMap, ArgsNative, ArgsXlat, Eof, Err, Probe, Provider, Tracepoint
from common.stash_format import (
    decode_probe_file,
    decode_records,
    encode_probe_file,
    encode_record,
)

# reference §4.4: provider test_prov, probe test:main:go, one tracepoint at 0x401136, no args
WORKED_EXAMPLE = bytes.fromhex(
    "0300000000000000"
    "2200000000000000" "00000000" "00000000" "0100000000000000" "746573745f70726f7600"
    "3500000000000000" "01000000" "00000000" "0100000000000000" "0000000000000000"
    "0000000000000000" "74657374006d61696e00676f00"
    "3000000000000000" "02000000" "00000000" "3611400000000000" "00000000" + "00" * 20
)  # fmt: skip

PROVIDER = Provider(name="test_prov", nprobes=1)
PROBE = Probe(mod="test", fun="main", prb="go", ntp=1, nargc=0, xargc=0)
TRACEPOINT = Tracepoint(addr=0x401136, is_enabled=False)


def test_worked_example_is_143_bytes_exactly() -> None:
    data = encode_probe_file(PROVIDER, PROBE, [], [TRACEPOINT])
    assert len(data) == 143
    assert data == WORKED_EXAMPLE


def test_worked_example_decodes() -> None:
    f = decode_probe_file(WORKED_EXAMPLE)
    assert (f.provider, f.probe, f.args, f.tracepoints) == (PROVIDER, PROBE, [], [TRACEPOINT])


@pytest.mark.parametrize(
    ("record", "size"),
    [
        (Provider(name="p", nprobes=3), 26),
        (Probe(mod="m", fun="f", prb="p", ntp=1, nargc=0, xargc=0), 46),
        (Tracepoint(addr=1, is_enabled=True), 48),
        (ArgsNative(args=["int", "char *"]), 16 + 4 + 7),
        (ArgsXlat(args=["int"]), 20),
        (ArgsMap(map=[1, 0]), 18),
        (Err(errno=22, message="bad"), 24),
        (Eof(), 16),
    ],
)
def test_record_sizes_and_roundtrip(record: object, size: int) -> None:
    raw = encode_record(record)  # type: ignore[arg-type]
    assert len(raw) == size
    assert int.from_bytes(raw[:8], "little") == size
    assert raw[12:16] == bytes(4)  # padding after the type is zero
    assert decode_records(raw) == [record]


def test_args_file_roundtrip() -> None:
    probe = Probe(mod="m", fun="f", prb="p", ntp=2, nargc=2, xargc=1)
    args = [ArgsNative(args=["int", "char *"]), ArgsXlat(args=["string"]), ArgsMap(map=[1])]
    tps = [Tracepoint(addr=0x10, is_enabled=False), Tracepoint(addr=0x8, is_enabled=True)]
    data = encode_probe_file(PROVIDER, probe, args, tps)
    f = decode_probe_file(data)
    assert (f.probe, f.args, f.tracepoints) == (probe, args, tps)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x02" + b[1:], "parsed version 2"),
        (lambda b: b[:7], "no version word"),
        (lambda b: b[:-1], "size 48 invalid"),
        (lambda b: b + (16).to_bytes(8, "little") + (9).to_bytes(8, "little"), "unknown type 9"),
        (lambda b: b[:8] + b[42:], "first record is not PROVIDER"),
    ],
)
def test_consumer_checks_reject(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StashFormatError, match=message):
        decode_probe_file(mutate(WORKED_EXAMPLE))


def test_argmap_entry_must_be_below_nargc() -> None:
    probe = Probe(mod="m", fun="f", prb="p", ntp=1, nargc=1, xargc=1)
    args = [ArgsNative(args=["int"]), ArgsXlat(args=["int"]), ArgsMap(map=[1])]
    data = encode_probe_file(PROVIDER, probe, args, [TRACEPOINT])
    with pytest.raises(StashFormatError, match="below nargc"):
        decode_probe_file(data)
