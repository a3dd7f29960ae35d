"""The real parser child (``python -I -m parserd``, seccomp-locked) through both notes exchanges.

Driven by :mod:`tests.parser.notes_pipe` (raw frames, no dtprobed), so this
proves the sandbox lets both paths run: ``LocateNotes`` with its
``ReadAt``/``ObjectBytes`` round trips, and ``ParseNoteBlocks`` with the two
blocks in its frame.  A forbidden syscall would kill the child with SIGSYS
and every test here would fail.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from common.grammar import check_stream
from common.limits import ParseLimits
from common.records import Eof, Err, NotesLocation, ReadAt
from common.requests import LocateNotes, ObjectBytes, ParseNoteBlocks
from parserd.dof_parse import parse_dof
from tests.parser.elf_build import (
    CountingReader,
    NoteProbe,
    NoteProvider,
    NoteSite,
    blocks_of,
    build_object,
    helper,
    locate,
    parse,
    parse_blocks,
)
from tests.parser.notes_pipe import ChildDied, NotesPipe

PROV = NoteProvider("prv", [NoteProbe("go", ["int", "char *"], [("long", 1)]), NoteProbe("x")])
SITES = [
    NoteSite("prv", "go", "main", 0x1100, sargs="-4@%edi 8@%rsi"),
    NoteSite("prv", "go", "main", 0x1180, enabled=True, sargc=1, sargs="8@%rax"),
    NoteSite("prv", "x", "other", 0x1200),
]


@pytest.fixture
def child() -> Iterator[NotesPipe]:
    pipe = NotesPipe()
    try:
        yield pipe
    finally:
        code = pipe.close()
        assert code != -signal.SIGSYS, "the sandbox killed the child"


def test_ready_line_says_the_child_is_locked() -> None:
    pipe = NotesPipe()
    try:
        assert "seccomp filter loaded" in pipe.ready
        answer = pipe.notes(helper(), build_object([PROV], SITES).data)
        assert isinstance(answer.location, NotesLocation)
        assert answer.records[-1] == Eof()
    finally:
        assert pipe.close() == 0


def test_locate_under_the_sandbox_equals_the_in_process_locate(child: NotesPipe) -> None:
    obj = build_object([PROV], SITES)
    answer = child.locate_notes(helper(), obj.data)
    reader = CountingReader(obj.data)
    assert answer.records == locate(obj, reader=reader)
    assert answer.reads == reader.calls
    assert len(answer.reads) == 3  # header, section table, section names: no section contents
    (loc,) = answer.records
    assert isinstance(loc, NotesLocation)
    assert (loc.notes_offset, loc.notes_size) == (obj.notes_offset, obj.notes_size)
    assert (loc.rodata_offset, loc.rodata_size, loc.rodata_addr) == (
        obj.rodata_offset, obj.rodata_size, obj.rodata_addr,
    )  # fmt: skip


def test_both_exchanges_under_the_sandbox_equal_the_in_process_parse(child: NotesPipe) -> None:
    obj = build_object([PROV], SITES)
    answer = child.notes(helper(), obj.data)
    assert answer.records == parse(obj)
    check_stream(answer.records, notes=True)
    blocks = blocks_of(obj)
    direct = child.parse_note_blocks(
        helper(), blocks.notes_addr, blocks.notes, blocks.rodata_addr, blocks.rodata
    )
    assert direct.records == parse_blocks(blocks) == answer.records
    assert direct.reads == []


def test_many_requests_of_every_kind_in_one_child(child: NotesPipe) -> None:
    dof = build_dof([ProviderSpec("d", [ProbeSpec("f", "p", [4])])]).data
    big = build_object([PROV], SITES, rodata_size=3 << 20).data  # 3 MiB .rodata in one frame
    broken = build_object([PROV], SITES).data[:100]
    for _ in range(3):
        assert child.notes(helper(), big).records == parse(big)
        assert child.parse_dof(helper(), dof).records == parse_dof(helper(), dof)
        out = child.notes(helper(), broken).records
        assert len(out) == 1 and isinstance(out[0], Err)
        bad = child.parse_note_blocks(helper(), 0, b"\0" * 12, 0, b"")
        assert bad.records == [Err(errno=22, message="Invalid name size 0")]


def test_budgets_reach_the_child() -> None:
    obj = build_object([PROV], SITES)
    pipe = NotesPipe(ParseLimits(max_object_reads=2, max_object_bytes=4096))
    try:
        answer = pipe.locate_notes(helper(), obj.data)
        assert answer.records == [
            Err(errno=7, message="reading section name table needs more than 2 object reads "
                "(max_object_reads)")
        ]  # fmt: skip
        assert len(answer.reads) == 2
        blocks = blocks_of(build_object([PROV], SITES, rodata_size=4096))
        answer = pipe.parse_note_blocks(helper(), 0, blocks.notes, blocks.rodata_addr,
                                        blocks.rodata)  # fmt: skip
        total = len(blocks.notes) + len(blocks.rodata)
        assert answer.records == [
            Err(errno=7, message=f"blocks .note.usdt and .rodata hold {total} bytes "
                f"({len(blocks.notes)} + 4096), more than 4096 (max_object_bytes)")
        ]  # fmt: skip
    finally:
        assert pipe.close() == 0


def test_a_short_answer_is_a_rejection_not_a_crash(child: NotesPipe) -> None:
    obj = build_object([PROV], SITES).data
    answer = child.locate_notes(helper(), obj[:-10], size=len(obj))
    assert len(answer.records) == 1 and isinstance(answer.records[0], Err)
    assert "the file changed?" in answer.records[0].message
    # and the child goes on
    assert child.notes(helper(), obj).records == parse(obj)


def test_a_longer_answer_ends_the_child_with_65() -> None:
    pipe = NotesPipe()
    try:
        pipe.send_raw(LocateNotes(helper=helper(), size=4096))
        (read_at,) = pipe.next_batch()
        assert isinstance(read_at, ReadAt)
        pipe.send_raw(ObjectBytes(data=bytes(read_at.size + 1)))
        log = pipe.next_batch()
        assert "bad object bytes from the host" in getattr(log[0], "message", "")
    finally:
        assert pipe.close() == 65


def test_object_bytes_as_a_request_ends_the_child_with_65() -> None:
    pipe = NotesPipe()
    try:
        pipe.send_raw(ObjectBytes(data=b"x"))
        (log,) = pipe.next_batch()
        assert "ObjectBytes frame without a ReadAt" in getattr(log, "message", "")
    finally:
        assert pipe.close() == 65


def test_a_request_instead_of_object_bytes_ends_the_child_with_65() -> None:
    pipe = NotesPipe()
    try:
        pipe.send_raw(LocateNotes(helper=helper(), size=4096))
        pipe.next_batch()  # the first ReadAt
        pipe.send_raw(ParseNoteBlocks(helper=helper(), notes_addr=0, notes=b"", rodata_addr=0,
                                      rodata=b""))  # fmt: skip
        log = pipe.next_batch()
        assert "bad object bytes from the host" in getattr(log[0], "message", "")
    finally:
        assert pipe.close() == 65


def test_host_closing_mid_exchange_ends_the_child() -> None:
    pipe = NotesPipe()
    pipe.send_raw(LocateNotes(helper=helper(), size=4096))
    pipe.next_batch()  # the first ReadAt
    assert pipe.close() == 65


def test_a_child_dying_is_reported_by_the_driver() -> None:
    pipe = NotesPipe()
    pipe.proc.kill()
    with pytest.raises(ChildDied):
        pipe.notes(helper(), build_object([PROV], SITES).data)
    pipe.close()
