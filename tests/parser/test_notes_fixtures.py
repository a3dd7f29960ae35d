"""Real objects built by Debian's dtrace 2.0.7 (``dtrace -G``), from ``fixtures/notes/``.

Each has a ``.readelf.txt`` beside it (how it was made and what readelf
shows); the addresses below are the ``usdt`` notes' offsets there.  Each
goes through both phases: ``LocateNotes`` on the file, then ``ParseNoteBlocks``
on the two blocks cut from it.  The fixtures are committed: a missing one is
a failure, not a skip.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from common.grammar import check_stream
from common.records import (
    ArgsMap,
    ArgsNative,
    ArgsXlat,
    Eof,
    Err,
    NotesLocation,
    Probe,
    Provider,
    ResultRecord,
    Tracepoint,
)
from tests.parser.elf_build import cut, helper, locate, parse, with_base
from tests.parser.notes_pipe import NotesPipe

FIXTURES = Path(__file__).parent / "fixtures" / "notes"
BASE = 0x7F12_3456_0000


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def records_of(name: str) -> list[ResultRecord]:
    return parse(load(name), dh=helper(name.encode(), BASE))


def location_of(name: str) -> NotesLocation:
    (loc,) = locate(load(name), dh=helper(name.encode(), BASE))
    assert isinstance(loc, NotesLocation), loc
    return loc


def test_checksums() -> None:
    for line in (FIXTURES / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256(load(name)).hexdigest() == digest, name


def test_et_exec_with_is_enabled_probes() -> None:
    assert location_of("fx_isenabled").base == 0
    assert records_of("fx_isenabled") == [
        Provider(name="fxen", nprobes=2),
        Probe(mod="fx_isenabled", fun="main", prb="work", ntp=2, nargc=2, xargc=2),
        ArgsNative(args=["int", "char *"]),
        ArgsXlat(args=["int", "char *"]),
        ArgsMap(map=[0, 1]),
        Tracepoint(addr=0x40083B, is_enabled=False, args="-4@%edi 8@(%rsi)"),
        Tracepoint(addr=0x400833, is_enabled=True, args="8@%rax"),
        Probe(mod="fx_isenabled", fun="main", prb="idle", ntp=2, nargc=0, xargc=0),
        Tracepoint(addr=0x40084A, is_enabled=False, args=""),
        Tracepoint(addr=0x400842, is_enabled=True, args="8@%rax"),
        Eof(),
    ]


def test_shared_library() -> None:
    assert location_of("libfx.so").base == BASE
    records = records_of("libfx.so")
    assert records[0] == Provider(name="fxlib", nprobes=2)
    probes = [r for r in records if isinstance(r, Probe)]
    assert [(p.fun, p.prb, p.ntp, p.nargc) for p in probes] == [
        ("fxlib_fire", "enter", 1, 0),
        ("fxlib_fire", "call", 1, 2),
    ]
    tps = [r for r in records if isinstance(r, Tracepoint)]
    assert all(tp.addr > BASE and tp.args is not None for tp in tps)
    assert tps[1].args == "-4@%eax 8@%rdx"
    check_stream(records, notes=True)


def test_every_kind_of_probe() -> None:
    records = records_of("fx_kinds")
    checker = check_stream(records, notes=True)
    assert [p.name for p in checker.providers] == ["fxkinds", "fxother"]
    by_name = {(pp.probe.fun, pp.probe.prb): pp for pp in checker.probes}
    # "x__y__z" and "a__b" in C are "x-y-z" and "a-b" in D
    assert {("main", "x-y-z"), ("main", "a-b")} <= set(by_name)
    # one probe in two functions is two probes; twice in one function is one with ntp 2
    assert by_name[("main", "multi")].probe.ntp == 2
    assert by_name[("helper", "multi")].probe.ntp == 1
    many = by_name[("main", "many")]
    assert many.probe.nargc == 10 and many.tracepoints[0].args is not None
    assert len(many.tracepoints[0].args.split()) == 10
    guarded = by_name[("main", "guarded")]
    assert [tp.is_enabled for tp in guarded.tracepoints] == [True, False]  # upstream's order


def test_pie_executable() -> None:
    assert location_of("fx_exec").base == BASE
    records = records_of("fx_exec")
    check_stream(records, notes=True)
    assert [r.prb for r in records if isinstance(r, Probe)] == ["start", "tick", "done-all"]


def test_relocatable_object_is_refused() -> None:
    assert locate(load("fx_kinds.o"), dh=helper(b"fx_kinds.o", BASE)) == [
        Err(errno=22, message="fx_kinds.o: unsupported ELF type 1 (only ET_EXEC and ET_DYN)")
    ]


def test_fixtures_through_the_sandboxed_child() -> None:
    pipe = NotesPipe()
    try:
        for name in ("fx_exec", "fx_isenabled", "fx_kinds", "libfx.so", "fx_kinds.o"):
            dh = helper(name.encode(), BASE)
            answer = pipe.notes(dh, load(name))
            assert answer.records == records_of(name), name
            if name != "fx_kinds.o":
                assert answer.location == location_of(name), name
                loc = location_of(name)
                blocks = cut(load(name), loc)
                again = pipe.parse_note_blocks(
                    with_base(dh, loc.base),
                    blocks.notes_addr,
                    blocks.notes,
                    blocks.rodata_addr,
                    blocks.rodata,
                )
                assert again.records == answer.records, name  # a reparse from the blocks
    finally:
        assert pipe.close() == 0
