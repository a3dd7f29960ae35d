"""Hostile bytes in-process: every input gets one ERR, or a stream the host accepts.

A small deterministic mutation run (no hypothesis: not a dependency): cut
points of the real libusdt DOF, and random field and byte edits of valid DOF
of every shape the tests build.  For each input ``parse_dof`` must return —
not raise — either exactly one ``Err`` (EINVAL or E2BIG) or records that
survive the msgpack schema round trip and the stash grammar.  The fuzz
harness (tests/fuzz/) does the same through the sandboxed child, at length.
"""

from __future__ import annotations

import random
import struct
from errno import E2BIG, EINVAL
from pathlib import Path

import msgspec

from common.dof_build import build_helper, many_probes_dof
from common.grammar import check_stream
from common.records import Err, ParserRecord, ResultRecord
from parserd.dof_parse import parse_dof
from tests.parser.dof_edit import base_dof, base_probe, base_v3, providers_dof

FIXTURES = Path(__file__).parent / "fixtures"
LIBUSDT = (FIXTURES / "libusdt-3probes.dof").read_bytes()
LIBUSDT_HELPER = (FIXTURES / "libusdt-3probes.dh").read_bytes()
INTERESTING = [0, 1, 7, 8, 0x30, 0x7F, 0x80, 0xFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               1 << 63, (1 << 64) - 1]  # fmt: skip
_DECODER = msgspec.msgpack.Decoder(list[ParserRecord])


def check(helper: bytes, data: bytes) -> list[ResultRecord]:
    records = parse_dof(helper, data)
    assert records, "empty answer"
    if isinstance(records[0], Err):
        assert len(records) == 1, records
        assert records[0].errno in (EINVAL, E2BIG)
    else:
        check_stream(records)
    # What the child sends is what the host can decode (schema bounds, name policy).
    assert _DECODER.decode(msgspec.msgpack.encode(records)) == records
    return records


def with_loadsz(data: bytearray | bytes) -> bytes:
    """Make ``dofh_loadsz`` agree with the length, so deeper rules are reached."""
    out = bytearray(data)
    if len(out) >= 48:
        struct.pack_into("<Q", out, 40, len(out))
    return bytes(out)


def seeds() -> list[tuple[bytes, bytes]]:
    relocated = base_dof().set_helper(addr=0x400000)
    return [
        (LIBUSDT_HELPER, LIBUSDT),
        (relocated.helper, bytes(relocated.data)),
        (build_helper(), bytes(base_v3().data)),
        (build_helper(), bytes(base_dof(version=1).data)),
        (build_helper(), bytes(providers_dof("a", "b").data)),
        (build_helper(), bytes(base_dof(base_probe(), base_probe(name="q")).data)),
        (build_helper(), many_probes_dof(12, relocate=True).data),
    ]


def test_seeds_are_accepted() -> None:
    for helper, data in seeds():
        assert not isinstance(check(helper, data)[0], Err)


def test_every_cut_of_libusdt() -> None:
    for size in range(len(LIBUSDT)):
        cut = LIBUSDT[:size]
        check(LIBUSDT_HELPER, cut)
        check(LIBUSDT_HELPER, with_loadsz(cut))


def test_random_field_and_byte_edits() -> None:
    rng = random.Random(20261125)
    pool = seeds()
    verdicts = {"accepted": 0, "rejected": 0}
    for _ in range(3000):
        helper, data = rng.choice(pool)
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            how = rng.random()
            if how < 0.4:  # an aligned u32 or u64 field set to an edge value
                width = rng.choice((4, 8))
                pos = rng.randrange(0, len(buf) - width + 1) & ~(width - 1)
                value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
                struct.pack_into("<Q" if width == 8 else "<I", buf, pos, value)
            elif how < 0.8:
                buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x2F, 0x3A, 0x7F, 0xFF))
            else:
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.8:
            buf = bytearray(with_loadsz(buf))
        records = check(helper, bytes(buf))
        verdicts["rejected" if isinstance(records[0], Err) else "accepted"] += 1
    # The run must reach the deep rules, not stop at the framing checks every time.
    assert verdicts["accepted"] > 100 and verdicts["rejected"] > 1000, verdicts


def test_random_helpers() -> None:
    rng = random.Random(7)
    data = bytes(base_dof().data)
    for _ in range(500):
        helper = bytes(rng.choice((0, 0x2E, 0x2F, 0x41, 0xC3, 0xFF)) for _ in range(80))
        check(helper, data)
    for size in (0, 1, 79, 81, 1000):
        assert isinstance(check(bytes(size), data)[0], Err)
