"""ELF-notes parser: valid objects give exactly upstream's records (in upstream's order).

Every object goes through both phases, as the host runs them
(:func:`tests.parser.elf_build.parse`): ``LocateNotes`` on the file, then
``ParseNoteBlocks`` on the two blocks cut from it.
"""

from __future__ import annotations

import pytest

from common.grammar import check_stream
from common.limits import MAX_OBJECT_READ, ParseLimits
from common.records import (
    ArgsMap,
    ArgsNative,
    ArgsXlat,
    Eof,
    Err,
    NotesLocation,
    Probe,
    Provider,
    Tracepoint,
)
from common.stash_format import decode_records, encode_record
from parserd import elf_notes
from parserd.elf_notes import _Htab, str2hval
from tests.parser.elf_build import (
    BASE,
    ET_EXEC,
    MODULE,
    Blocks,
    CountingReader,
    NoteProbe,
    NoteProvider,
    NoteSite,
    blocks_of,
    build_object,
    locate,
    parse,
)

MOD = MODULE.decode()


def test_one_probe_every_record_kind() -> None:
    prov = NoteProvider(
        "myprov",
        [NoteProbe("req-start", ["int", "char *"], [("long", 1), ("int", 0)]), NoteProbe("unused")],
    )
    sites = [NoteSite("myprov", "req__start", "handle", 0x1234, sargs="-4@%edi 8@%rsi")]
    obj = build_object([prov], sites)
    assert locate(obj) == [
        NotesLocation(
            base=BASE, notes_addr=0, notes_offset=obj.notes_offset, notes_size=obj.notes_size,
            rodata_addr=obj.rodata_addr, rodata_offset=obj.rodata_offset,
            rodata_size=obj.rodata_size,
        )
    ]  # fmt: skip
    records = parse(obj)
    assert records == [
        Provider(name="myprov", nprobes=1),
        Probe(mod=MOD, fun="handle", prb="req-start", ntp=1, nargc=2, xargc=2),
        ArgsNative(args=["int", "char *"]),
        ArgsXlat(args=["long", "int"]),
        ArgsMap(map=[1, 0]),
        Tracepoint(addr=BASE + 0x1234, is_enabled=False, args="-4@%edi 8@%rsi"),
        Eof(),
    ]
    check_stream(records, notes=True)
    assert parse(blocks_of(obj)) == records  # the blocks alone, as at a reparse


def test_et_exec_base_is_zero() -> None:
    prov = NoteProvider("p", [NoteProbe("a")])
    obj = build_object([prov], [NoteSite("p", "a", "main", 0x401136)], e_type=ET_EXEC)
    (loc,) = locate(obj)
    assert isinstance(loc, NotesLocation) and loc.base == 0
    assert parse(obj) == [
        Provider(name="p", nprobes=1),
        Probe(mod=MOD, fun="main", prb="a", ntp=1, nargc=0, xargc=0),
        Tracepoint(addr=0x401136, is_enabled=False, args=""),
        Eof(),
    ]


def test_probes_and_providers_without_tracepoints_are_not_emitted() -> None:
    provs = [NoteProvider("idle", [NoteProbe("x")]), NoteProvider("p", [NoteProbe("a")])]
    assert parse(build_object(provs, [])) == [Eof()]
    records = parse(build_object(provs, [NoteSite("p", "a", "f", 0x10)]))
    assert [type(r) for r in records] == [Provider, Probe, Tracepoint, Eof]


def test_a_probe_in_several_functions_and_several_sites() -> None:
    prov = NoteProvider("p", [NoteProbe("a", ["int"])])
    sites = [
        NoteSite("p", "a", "f", 0x30, sargs="-4@%edi"),
        NoteSite("p", "a", "g", 0x20, sargs="-4@%esi"),
        NoteSite("p", "a", "f", 0x10, sargs="-4@%eax"),
        NoteSite("p", "a", "f", 0x18, enabled=True, sargc=1, sargs="8@%rax"),
    ]
    records = parse(build_object([prov], sites))
    check_stream(records, notes=True)
    probes = [r for r in records if isinstance(r, Probe)]
    assert sorted((p.fun, p.ntp) for p in probes) == [("f", 3), ("g", 1)]
    f_start = records.index(next(p for p in probes if p.fun == "f"))
    # upstream's order: prbmap (one slot, newest note first) validates 0x18, 0x10, 0x30;
    # upstream writes the first validated, then the others in reverse
    assert records[f_start + 2 : f_start + 5] == [
        Tracepoint(addr=BASE + 0x18, is_enabled=True, args="8@%rax"),
        Tracepoint(addr=BASE + 0x30, is_enabled=False, args="-4@%edi"),
        Tracepoint(addr=BASE + 0x10, is_enabled=False, args="-4@%eax"),
    ]
    assert Provider(name="p", nprobes=2) in records


def test_str2hval_is_upstreams() -> None:
    assert str2hval(b"", 7) == 7
    assert str2hval(b"a", 0) == 0x61
    assert str2hval(b"ab", 0) == 0x672
    # bytes >= 0x80 are signed chars on x86_64: 0 + (char)0xc3 = 0xffffffc3; the top
    # nibble 0xf is folded into bits 4-7 (0xc3 ^ 0xf0 = 0x33) and cleared
    assert str2hval(b"\xc3", 0) == 0x0FFFFF33
    # the seed is shifted like any earlier character
    assert str2hval(b"a", 0x10) == 0x161


def test_htab_order_by_hand() -> None:
    """dt_htab: one slot, new buckets first; the 5th bucket doubles it (nbuckets/2 > size).

    Keys a..e hash to 0x61..0x65.  Before the resize slot 0 holds d c b a; the
    resize walks it in that order prepending into slot (h & 1): slot 0 = b d,
    slot 1 = a c; then e goes first into slot 1.  Iteration: b d e a c.
    """
    tab = _Htab()
    for name in "abcde":
        tab.insert(str2hval(name.encode(), 0), name)
    assert list(tab) == ["b", "d", "e", "a", "c"]
    assert tab.size == 2


def test_providers_come_in_upstreams_hash_order() -> None:
    provs = [NoteProvider(name, [NoteProbe("x")]) for name in "abcde"]
    sites = [NoteSite(name, "x", "f", 0x10 * (i + 1)) for i, name in enumerate("abcde")]
    records = parse(build_object(provs, sites))
    assert [r.name for r in records if isinstance(r, Provider)] == ["b", "d", "e", "a", "c"]
    # two providers: newest first
    records = parse(build_object(provs[:2], sites[:2]))
    assert [r.name for r in records if isinstance(r, Provider)] == ["b", "a"]


def test_first_error_follows_upstreams_tracepoint_order() -> None:
    """Validation walks prbmap: with one slot, the last usdt note is checked first."""
    prov = NoteProvider("p", [NoteProbe("a")])
    sites = [NoteSite("p", "nope1", "f", 0x10), NoteSite("p", "nope2", "f", 0x20)]
    out = parse(build_object([prov], sites))
    assert out == [Err(errno=2, message="No such probe: p:::nope2")]


def test_function_specific_probe_lookup_quirk_is_merged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream misses an existing probe once pmap has >= 32 slots; we merge (see docstring)."""
    merged = []

    class Probes(dict):  # type: ignore[type-arg]
        def get(self, key: object, default: object = None) -> object:
            found = dict.get(self, key, default)
            if found is not None:
                merged.append(key)
            return found

    real_init = elf_notes._Provider.__init__

    def init(self: elf_notes._Provider, name: bytes, text: str) -> None:
        real_init(self, name, text)
        self.probes = Probes()

    monkeypatch.setattr(elf_notes._Provider, "__init__", init)
    names = [f"p{i}" for i in range(64)]
    prov = NoteProvider("prv", [NoteProbe(n) for n in names])
    sites = [NoteSite("prv", n, "main", 0x100 + 0x10 * i) for i, n in enumerate(names)]
    sites += [NoteSite("prv", n, "main", 0x8000 + 0x10 * i, enabled=True, sargc=1)
              for i, n in enumerate(names)]  # fmt: skip
    records = parse(build_object([prov], sites))
    check_stream(records, notes=True)
    probes = [r for r in records if isinstance(r, Probe)]
    assert len(probes) == 64 and all(p.ntp == 2 for p in probes)
    assert records[0] == Provider(name="prv", nprobes=64)
    assert len(merged) == 15  # upstream would have emitted 15 duplicate PROBE records


def test_tracepoint_at_offset_zero_is_kept() -> None:
    prov = NoteProvider("p", [NoteProbe("a")])
    records = parse(build_object([prov], [NoteSite("p", "a", "f", 0)]))
    assert Tracepoint(addr=BASE, is_enabled=False, args="") in records


def test_usdt_note_types_other_than_2_are_regular_probes() -> None:
    from common.notes_build import note, prov_desc, usdt_desc

    prov = NoteProvider("p", [NoteProbe("a")])
    site = NoteSite("p", "a", "main", 0x40)
    base = build_object([prov], [site])
    notes = note(b"prov", 1, prov_desc(prov)) + note(
        b"usdt", 7, usdt_desc(site, base.function_addrs["main"])
    )
    obj = build_object([prov], [site], notes=notes)
    assert Tracepoint(addr=BASE + 0x40, is_enabled=False, args="") in parse(obj)


def test_stream_survives_the_stash_format() -> None:
    prov = NoteProvider("p", [NoteProbe("a", ["int"])])
    records = parse(build_object([prov], [NoteSite("p", "a", "f", 0x10, sargs="-4@%edi")]))
    body = [r for r in records if not isinstance(r, Eof)]
    raw = b"".join(encode_record(r) for r in body)
    assert decode_records(raw) == body
    tp = next(r for r in body if isinstance(r, Tracepoint))
    assert len(encode_record(tp)) == 28 + len("-4@%edi") + 1


@pytest.mark.parametrize("rodata_size", [4096, 3 * MAX_OBJECT_READ])
def test_rodata_is_never_read_by_the_parser_and_parsed_whole(rodata_size: int) -> None:
    prov = NoteProvider("p", [NoteProbe("a")])
    sites = [NoteSite("p", "a", f"fn{i}", 0x10 * (i + 1)) for i in range(50)]
    obj = build_object([prov], sites, rodata_size=rodata_size)
    reader = CountingReader(obj.data)
    assert isinstance(locate(obj, reader=reader)[0], NotesLocation)
    assert not any(obj.notes_offset <= o < obj.shstrtab_offset for o, _ in reader.calls)
    records = parse(obj)
    assert sorted(r.fun for r in records if isinstance(r, Probe)) == sorted(
        f"fn{i}" for i in range(50)
    )


def test_function_names_far_apart_in_a_big_rodata_block() -> None:
    prefix = bytearray(b"\0" * (3 * MAX_OBJECT_READ))
    placed = {}
    for i, at in enumerate([16, MAX_OBJECT_READ + 5, 3 * MAX_OBJECT_READ - 8]):
        name = f"f{i}".encode()
        prefix[at : at + len(name) + 1] = name + b"\0"
        placed[f"f{i}"] = at
    prov = NoteProvider("p", [NoteProbe("a")])
    from common.notes_build import note, prov_desc, usdt_desc

    notes = note(b"prov", 1, prov_desc(prov))
    for i, (fun, at) in enumerate(placed.items()):
        site = NoteSite("p", "a", fun, 0x10 * (i + 1))
        notes += note(b"usdt", 1, usdt_desc(site, 0x2000 + at))
    records = parse(Blocks(notes, bytes(prefix), 0x2000))
    assert sorted(r.fun for r in records if isinstance(r, Probe)) == ["f0", "f1", "f2"]
    # the same notes against a .rodata block at another address: no names there
    assert parse(Blocks(notes, bytes(prefix), 0x10_0000)) == [
        Err(errno=22, message="Invalid function name offset")
    ]


def test_notes_addr_does_not_change_the_parse() -> None:
    obj = build_object([NoteProvider("p", [NoteProbe("a")])], [NoteSite("p", "a", "f", 0x10)])
    blocks = blocks_of(obj)
    assert parse(blocks._replace(notes_addr=0xDEAD0000)) == parse(blocks)


def test_the_default_budget_admits_big_blocks() -> None:
    prov = NoteProvider("p", [NoteProbe("a")])
    obj = build_object([prov], [NoteSite("p", "a", "f", 0x10)], rodata_size=32 << 20)
    assert parse(obj, limits=ParseLimits())[-1] == Eof()
