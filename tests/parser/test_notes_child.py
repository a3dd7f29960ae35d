"""The real parser child (``python -I -m parserd``, seccomp-locked) through ParseNotes exchanges.

Driven by :mod:`tests.parser.notes_pipe` (raw frames, no dtprobed), so this
proves the sandbox lets the ReadAt/ObjectBytes path run: a forbidden syscall
would kill the child with SIGSYS and every test here would fail.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from common.limits import ParseLimits
from common.records import Err, ObjectBase
from common.requests import ObjectBytes, ParseNotes
from parserd.dof_parse import parse_dof
from parserd.elf_notes import parse_notes
from tests.parser.elf_build import (
    CountingReader,
    NoteProbe,
    NoteProvider,
    NoteSite,
    build_object,
    helper,
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


def local(
    obj: bytes, limits: ParseLimits | None = None
) -> tuple[list[object], list[tuple[int, int]]]:
    reader = CountingReader(obj)
    return list(parse_notes(helper(), len(obj), reader, limits)), reader.calls


def test_ready_line_says_the_child_is_locked() -> None:
    pipe = NotesPipe()
    try:
        assert "seccomp filter loaded" in pipe.ready
        answer = pipe.parse_notes(helper(), build_object([PROV], SITES).data)
        assert isinstance(answer.records[0], ObjectBase)
    finally:
        assert pipe.close() == 0


def test_notes_exchange_under_the_sandbox_equals_the_in_process_parse(child: NotesPipe) -> None:
    obj = build_object([PROV], SITES).data
    answer = child.parse_notes(helper(), obj)
    records, calls = local(obj)
    assert answer.records == records
    assert answer.reads == calls
    assert len(answer.reads) == 5  # header, section table, names, notes, .rodata


def test_many_requests_of_both_kinds_in_one_child(child: NotesPipe) -> None:
    dof = build_dof([ProviderSpec("d", [ProbeSpec("f", "p", [4])])]).data
    big = build_object([PROV], SITES, rodata_size=3 << 20).data  # .rodata read by windows
    broken = build_object([PROV], SITES).data[:100]
    for _ in range(3):
        assert child.parse_notes(helper(), big).records == local(big)[0]
        assert child.parse_dof(helper(), dof).records == parse_dof(helper(), dof)
        out = child.parse_notes(helper(), broken).records
        assert len(out) == 1 and isinstance(out[0], Err)


def test_budgets_reach_the_child() -> None:
    pipe = NotesPipe(ParseLimits(max_object_reads=3))
    try:
        answer = pipe.parse_notes(helper(), build_object([PROV], SITES).data)
        assert answer.records == [
            Err(errno=7, message="reading section .note.usdt needs more than 3 object reads "
                "(max_object_reads)")
        ]  # fmt: skip
        assert len(answer.reads) == 3
    finally:
        assert pipe.close() == 0


def test_a_short_answer_is_a_rejection_not_a_crash(child: NotesPipe) -> None:
    obj = build_object([PROV], SITES).data
    answer = child.parse_notes(helper(), obj[:-10], size=len(obj))
    assert len(answer.records) == 1 and isinstance(answer.records[0], Err)
    assert "the file changed?" in answer.records[0].message
    # and the child goes on
    assert child.parse_notes(helper(), obj).records == local(obj)[0]


def test_a_longer_answer_ends_the_child_with_65() -> None:
    pipe = NotesPipe()
    try:
        pipe.send_raw(ParseNotes(helper=helper(), size=4096))
        (read_at,) = pipe.next_batch()
        pipe.send_raw(ObjectBytes(data=bytes(getattr(read_at, "size", 0) + 1)))
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


def test_host_closing_mid_exchange_ends_the_child() -> None:
    pipe = NotesPipe()
    pipe.send_raw(ParseNotes(helper=helper(), size=4096))
    pipe.next_batch()  # the first ReadAt
    assert pipe.close() == 65


def test_a_child_dying_is_reported_by_the_driver() -> None:
    pipe = NotesPipe()
    pipe.proc.kill()
    with pytest.raises(ChildDied):
        pipe.parse_notes(helper(), build_object([PROV], SITES).data)
    pipe.close()
