"""Accepted DOF: the exact records, in reference §2.5 D order, and a valid stream."""

from __future__ import annotations

import struct

import pytest

from common.dof_abi import (
    DOF_SECT_COMMENTS,
    DOF_SECT_DIF,
    DOF_SECT_PROFFS,
    DOF_SECT_PROVIDER,
    DOF_SECT_STRTAB,
)
from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper, many_probes_dof
from common.grammar import check_stream
from common.records import (
    ArgsMap,
    ArgsNative,
    ArgsXlat,
    Eof,
    Err,
    Probe,
    Provider,
    ResultRecord,
    Tracepoint,
)
from parserd.dof_parse import parse_dof
from tests.parser.dof_edit import BASE_ADDR, Dof, base_dof, base_probe, providers_dof


def accepted(helper: bytes, data: bytes | bytearray) -> list[ResultRecord]:
    """Parse, and check that the answer is a complete, grammatical stream."""
    records = parse_dof(helper, bytes(data))
    assert not isinstance(records[0], Err), records[0]
    checker = check_stream(records)
    assert checker.error is None
    assert records[-1] == Eof()
    return records


def tp(addr: int, is_enabled: bool = False) -> Tracepoint:
    return Tracepoint(addr=addr, is_enabled=is_enabled)


def test_one_provider() -> None:
    dof = base_dof()
    assert accepted(dof.helper, dof.data) == [
        Provider(name="prov", nprobes=1),
        Probe(mod="a.out", fun="fn", prb="pr", ntp=2, nargc=2, xargc=1),
        ArgsNative(args=["int", "char *"]),
        ArgsXlat(args=["char *"]),
        ArgsMap(map=[1]),
        tp(BASE_ADDR + 0x10),  # offsets were given as 0x20, 0x10: emitted sorted
        tp(BASE_ADDR + 0x20),
        Eof(),
    ]


def test_several_providers_same_probe_names() -> None:
    """All providers, then one EOF (upstream's 2024 one-provider bug not reproduced)."""
    dof = providers_dof("alpha", "beta")
    probes = [
        Probe(mod="a.out", fun="f", prb="a", ntp=1, nargc=0, xargc=0),
        tp(0x401004),
        Probe(mod="a.out", fun="f", prb="b", ntp=1, nargc=0, xargc=0),
        tp(0x401008),
    ]
    assert accepted(dof.helper, dof.data) == [
        Provider(name="alpha", nprobes=2),
        *probes,
        Provider(name="beta", nprobes=2),
        *probes,
        Eof(),
    ]


def test_2000_probes() -> None:
    """The size of upstream's tst.manyprobes (about 206 KiB)."""
    built = many_probes_dof(2000)
    assert 200 * 1024 <= len(built.data) <= 212 * 1024
    records = accepted(build_helper(), built.data)
    assert len(records) == 1 + 2000 * 3 + 1
    assert records[0] == Provider(name="bench", nprobes=2000)
    for i in (0, 1000, 1999):
        probe, native, tracepoint = records[1 + 3 * i : 4 + 3 * i]
        assert probe == Probe(
            mod="a.out",
            fun=f"test_function_{i:05d}",
            prb=f"test_probe_{i:05d}",
            ntp=1,
            nargc=3,
            xargc=0,
        )
        assert native == ArgsNative(args=["int", "char *", "long"])
        assert tracepoint == tp(0x401000 + 0x40 * i + 0x10)


def test_native_and_translated_arguments() -> None:
    probe = ProbeSpec(
        func="f",
        name="p",
        offsets=[4],
        native=["int", "char *", "long"],
        xlat=["string", "int"],
        argmap=[1, 0],
    )
    dof = Dof(build_dof([ProviderSpec("prov", [probe, ProbeSpec("f", "plain", [8])])]))
    assert accepted(dof.helper, dof.data)[1:-1] == [
        Probe(mod="a.out", fun="f", prb="p", ntp=1, nargc=3, xargc=2),
        ArgsNative(args=["int", "char *", "long"]),
        ArgsXlat(args=["string", "int"]),
        ArgsMap(map=[1, 0]),
        tp(0x401004),
        Probe(mod="a.out", fun="f", prb="plain", ntp=1, nargc=0, xargc=0),
        tp(0x401008),
    ]


def test_native_only_arguments() -> None:
    dof = base_dof(base_probe(xlat=[], argmap=[]))
    records = accepted(dof.helper, dof.data)
    assert records[1:3] == [
        Probe(mod="a.out", fun="fn", prb="pr", ntp=2, nargc=2, xargc=0),
        ArgsNative(args=["int", "char *"]),
    ]
    assert isinstance(records[3], Tracepoint)


def test_shared_argument_runs_give_equal_records() -> None:
    """Probes whose type strings share bytes get equal records (the parser reuses them)."""
    built = many_probes_dof(3)
    records = accepted(build_helper(), built.data)
    natives = [r for r in records if isinstance(r, ArgsNative)]
    assert natives == [ArgsNative(args=["int", "char *", "long"])] * 3


ENABLED_PROBE = base_probe(offsets=[0x30, 0x10], enoffsets=[0x28, 0x8], xlat=[], argmap=[])


def test_is_enabled_v2_dropped() -> None:
    dof = Dof(build_dof([ProviderSpec("prov", [ENABLED_PROBE])], version=2))
    assert accepted(dof.helper, dof.data)[1:-1] == [
        Probe(mod="a.out", fun="fn", prb="pr", ntp=2, nargc=2, xargc=0),
        ArgsNative(args=["int", "char *"]),
        tp(BASE_ADDR + 0x10),
        tp(BASE_ADDR + 0x30),
    ]


def test_is_enabled_v3_kept_after_regular() -> None:
    dof = Dof(build_dof([ProviderSpec("prov", [ENABLED_PROBE])]))
    assert dof.data[6] == 3  # dtrace -G's choice with is-enabled probes
    assert accepted(dof.helper, dof.data)[1:-1] == [
        Probe(mod="a.out", fun="fn", prb="pr", ntp=4, nargc=2, xargc=0),
        ArgsNative(args=["int", "char *"]),
        tp(BASE_ADDR + 0x10),
        tp(BASE_ADDR + 0x30),
        tp(BASE_ADDR + 0x8, True),
        tp(BASE_ADDR + 0x28, True),
    ]


def test_v3_probe_with_only_is_enabled_offsets() -> None:
    dof = base_dof(base_probe(offsets=[], enoffsets=[0x8], xlat=[], argmap=[]))
    assert accepted(dof.helper, dof.data)[-2:] == [tp(BASE_ADDR + 0x8, True), Eof()]


def test_offsets_differing_by_2_to_the_31() -> None:
    """Appendix 4: upstream's signed comparator calls these duplicates."""
    dof = base_dof(base_probe(offsets=[0x80000020, 0x10], xlat=[], argmap=[]))
    assert accepted(dof.helper, dof.data)[-3:-1] == [
        tp(BASE_ADDR + 0x10),
        tp(BASE_ADDR + 0x80000020),
    ]


def test_relocation_below_equal_above_base() -> None:
    """SETX: a value ≤ dofhp_addr gets the base added; above it, the loader did it already."""
    base = 0x400000
    probes = [
        ProbeSpec("f", "below", [4], addr=0x1000),
        ProbeSpec("f", "equal", [4], addr=base),
        ProbeSpec("f", "above", [4], addr=base + 1),
    ]
    dof = Dof(build_dof([ProviderSpec("prov", probes, relocate=True)])).set_helper(addr=base)
    tracepoints = [r for r in accepted(dof.helper, dof.data) if isinstance(r, Tracepoint)]
    assert tracepoints == [tp(0x1000 + base + 4), tp(base + base + 4), tp(base + 1 + 4)]


def test_unrelocated_address_used_as_is() -> None:
    """Without a SETX relocation ``dofpr_addr`` is used as it is, even below dofhp_addr.

    Upstream's emit step adds nothing (usdt_parser_dof.c: ``dthpb_base =
    dofpr_addr``, tracepoint = base + offset); libusdt relies on this: its
    addresses are absolute and need not lie above the DOF's own address.
    """
    dof = base_dof(base_probe(addr=0x1000), relocate=False).set_helper(addr=0x400000)
    assert accepted(dof.helper, dof.data)[-3:-1] == [tp(0x1010), tp(0x1020)]


def test_dof_v1_provider_layout() -> None:
    """DOF v1: a 40-byte provider; is-enabled fields of the probe are ignored."""
    dof = base_dof(version=1)
    assert dof.sec(DOF_SECT_PROVIDER).size == 40
    dof.set_probe(0, "enoffidx", 7).set_probe(0, "nenoffs", 5)
    assert accepted(dof.helper, dof.data)[1] == Probe(
        mod="a.out", fun="fn", prb="pr", ntp=2, nargc=2, xargc=1
    )


def test_ignored_sections() -> None:
    """DIF and unloaded non-loadable sections are never interpreted.

    Retyping the URELHDR (section 5) shows it: its relocation no longer applies.
    """
    base = 0x500000  # above every dofpr_addr: a SETX would add it
    relocated = base_dof().set_helper(addr=base)
    assert accepted(relocated.helper, relocated.data)[-3] == tp(base + BASE_ADDR + 0x10)
    dif = base_dof().set_helper(addr=base).set_section(5, "type", DOF_SECT_DIF)
    comments = base_dof().set_helper(addr=base).set_section(5, "type", DOF_SECT_COMMENTS)
    comments.set_section(5, "flags", 0)
    for dof in (dif, comments):
        assert accepted(dof.helper, dof.data)[-3] == tp(BASE_ADDR + 0x10)


def test_no_provider_is_just_eof() -> None:
    dof = Dof(build_dof([]))
    assert accepted(dof.helper, dof.data) == [Eof()]


def test_no_sections_is_just_eof() -> None:
    dof = base_dof().set_header("secnum", 0)
    assert accepted(dof.helper, dof.data) == [Eof()]


def test_module_is_dofhp_mod_up_to_its_nul() -> None:
    dof = base_dof()
    helper = build_helper(b"libfoo.so.1\0garbage after the NUL")
    assert accepted(helper, dof.data)[1] == Probe(
        mod="libfoo.so.1", fun="fn", prb="pr", ntp=2, nargc=2, xargc=1
    )


def test_longest_names_accepted() -> None:
    """Names one byte under upstream's limits, and a full name of exactly 255 bytes."""
    spec = ProbeSpec("f" * 127, "n" * 60, [4])
    dof = Dof(build_dof([ProviderSpec("p" * 63, [spec])])).set_helper(b"m" * 1)
    assert len(f"{'p' * 63}:m:{'f' * 127}:{'n' * 60}") == 254
    records = accepted(dof.helper, dof.data)
    assert records[0] == Provider(name="p" * 63, nprobes=1)
    dof.set_helper(b"mm")
    accepted(dof.helper, dof.data)


def test_input_not_modified() -> None:
    """Relocation works on a private copy: the caller's bytes are left alone."""
    dof = base_dof().set_helper(addr=0x7F0000000000)
    data = bytes(dof.data)
    accepted(dof.helper, data)
    assert data == bytes(dof.data)


def test_parse_is_repeatable() -> None:
    """No state survives between calls (caches are per parse)."""
    dof = base_dof()
    first = parse_dof(dof.helper, bytes(dof.data))
    other = providers_dof("x")
    parse_dof(other.helper, bytes(other.data))
    assert parse_dof(dof.helper, bytes(dof.data)) == first


@pytest.mark.parametrize("unknown_type", [27, 99, 0xFFFFFFFF])
def test_unknown_section_type_without_load_flag_is_skipped(unknown_type: int) -> None:
    """Upstream's loadable test lists the known loadable types, so an unknown type
    without DOF_SECF_LOAD is skipped like COMMENTS, and the DOF is accepted."""
    base = 0x500000
    dof = base_dof().set_helper(addr=base).set_section(5, "type", unknown_type)
    dof.set_section(5, "flags", 0)
    assert accepted(dof.helper, dof.data)[-3] == tp(BASE_ADDR + 0x10)


def test_offset_table_overlapping_the_string_table_keeps_the_names() -> None:
    """A documented difference from upstream (module docstring of parserd.dof_parse).

    Here the PROFFS section is laid over the STRTAB, so the probe's offsets are
    the string table's first words.  Upstream sorts the offsets *in place*, which
    rewrites the string table before it reads the names back; we sort a copy, so
    the names stay what was validated and the tracepoints are the sorted words.
    """
    dof = base_dof()
    strtab = dof.sec(DOF_SECT_STRTAB)
    proffs = dof.sec(DOF_SECT_PROFFS)
    assert strtab.offset % 4 == 0 and strtab.size >= 8
    dof.set_section(proffs.index, "offset", strtab.offset)
    dof.set_section(proffs.index, "size", strtab.size - strtab.size % 4)
    table = struct.unpack_from(f"<{strtab.size // 4}I", dof.data, strtab.offset)
    # two neighbouring words out of order: upstream's in-place sort swaps them
    first = next(i for i in range(len(table) - 1) if table[i] > table[i + 1] > 0)
    dof.set_probe(0, "offidx", first).set_probe(0, "noffs", 2)
    words = table[first : first + 2]
    records = accepted(dof.helper, dof.data)
    assert records[0] == Provider(name="prov", nprobes=1)
    assert records[1] == Probe(mod="a.out", fun="fn", prb="pr", ntp=2, nargc=2, xargc=1)
    tracepoints = [r for r in records if isinstance(r, Tracepoint)]
    assert tracepoints == [tp(BASE_ADDR + w) for w in sorted(words)]
    at = strtab.offset + 4 * first
    assert bytes(dof.data[at : at + 8]) == struct.pack("<2I", *words)  # ours sorted a copy
