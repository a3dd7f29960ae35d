"""The parse cache: a byte-identical request of another requester skips the real parser child.

Every test runs the real sandboxed parser; the child's own request counter
(``RunningChild.requests``) tells whether a request reached it.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper
from common.errors import RequestRejected
from common.limits import ParseLimits
from dtprobed.children.parsecache import ParseCache
from dtprobed.children.parser import ParserChild, notes_helper

HELPER = build_helper("a.out", 0)
PARENT, FORK_CHILD, OTHER = 1001, 1002, 1003


def _dof(tag: str = "c", nprobes: int = 3) -> bytes:
    probes = [ProbeSpec("main", f"p{i}", [0x10 * (i + 1)], native=["int"]) for i in range(nprobes)]
    return build_dof([ProviderSpec(tag, probes)]).data


@pytest.fixture
def cached() -> Iterator[tuple[ParserChild, ParseCache]]:
    cache = ParseCache()
    pc = ParserChild(limits=ParseLimits(), timeout=10, cache=cache)
    try:
        yield pc, cache
    finally:
        pc.stop()


def _requests(pc: ParserChild) -> int:
    child = pc._child
    assert child is not None
    return child.requests


def test_fork_child_request_is_answered_from_the_cache(
    cached: tuple[ParserChild, ParseCache],
) -> None:
    pc, cache = cached
    dof = _dof()
    first = pc.parse_result(HELPER, dof, requester=PARENT)
    sent = _requests(pc)
    ran: list[int] = []
    again = pc.parse_result(HELPER, dof, requester=FORK_CHILD, meanwhile=lambda: ran.append(1))
    assert _requests(pc) == sent  # the child never saw it
    assert again.records == first.records and again.probes == first.probes
    assert ran == [1]  # the receiver's /proc reads still run
    assert cache.hits == 1
    assert list(again.tracepoint_addrs()) == list(first.tracepoint_addrs())


def test_same_requester_is_parsed_again(cached: tuple[ParserChild, ParseCache]) -> None:
    pc, cache = cached
    dof = _dof()
    pc.parse_result(HELPER, dof, requester=PARENT)
    sent = _requests(pc)
    pc.parse_result(HELPER, dof, requester=PARENT)
    assert _requests(pc) == sent + 1 and cache.hits == 0


def test_other_bytes_or_helper_miss(cached: tuple[ParserChild, ParseCache]) -> None:
    pc, cache = cached
    dof = _dof()
    pc.parse_result(HELPER, dof, requester=PARENT)
    sent = _requests(pc)
    # another relocation base, another module name, one byte of DOF changed
    pc.parse_result(build_helper("a.out", 0x1000), dof, requester=FORK_CHILD)
    pc.parse_result(build_helper("b.out", 0), dof, requester=FORK_CHILD)
    pc.parse_result(HELPER, _dof("d"), requester=FORK_CHILD)
    assert _requests(pc) == sent + 3 and cache.hits == 0


def test_rejected_request_is_not_kept(cached: tuple[ParserChild, ParseCache]) -> None:
    pc, cache = cached
    bad = bytearray(_dof())
    bad[0] = 0  # not DOF magic
    for requester in (PARENT, FORK_CHILD):
        with pytest.raises(RequestRejected) as err:
            pc.parse_result(HELPER, bytes(bad), requester=requester)
        assert err.value.errno == errno.EINVAL
    assert _requests(pc) == 2 and len(cache) == 0


def test_no_requester_no_cache(cached: tuple[ParserChild, ParseCache]) -> None:
    pc, cache = cached
    dof = _dof()
    pc.parse_result(HELPER, dof)
    pc.parse_result(HELPER, dof)
    assert _requests(pc) == 2 and len(cache) == 0


def test_a_caller_cannot_alter_the_cached_result(cached: tuple[ParserChild, ParseCache]) -> None:
    pc, _ = cached
    dof = _dof()
    first = pc.parse_result(HELPER, dof, requester=PARENT)
    expected = list(first.records)
    first.records.clear()
    first.probes.clear()
    hit = pc.parse_result(HELPER, dof, requester=FORK_CHILD)
    assert hit.records == expected
    hit.records.pop()
    assert pc.parse_result(HELPER, dof, requester=OTHER).records == expected


def test_bounds_evict_least_recently_used() -> None:
    cache = ParseCache(max_entries=2, max_records=1000)
    pc = ParserChild(limits=ParseLimits(), timeout=10, cache=cache)
    try:
        a, b, c = _dof("a"), _dof("b"), _dof("c")
        for dof in (a, b):
            pc.parse_result(HELPER, dof, requester=PARENT)
        pc.parse_result(HELPER, a, requester=FORK_CHILD)  # a is now the most recent
        pc.parse_result(HELPER, c, requester=PARENT)  # evicts b
        assert len(cache) == 2
        sent = _requests(pc)
        pc.parse_result(HELPER, a, requester=OTHER)
        assert _requests(pc) == sent  # kept
        pc.parse_result(HELPER, b, requester=OTHER)
        assert _requests(pc) == sent + 1  # evicted: parsed again
        # a result over a quarter of the record budget is never kept
        big = _dof("big", nprobes=100)  # 1 + 100 * 3 + 1 records > 250
        pc.parse_result(HELPER, big, requester=PARENT)
        sent = _requests(pc)
        pc.parse_result(HELPER, big, requester=OTHER)
        assert _requests(pc) == sent + 1
        assert cache.records <= cache.max_records
    finally:
        pc.stop()


NOTES_OBJECT = Path(__file__).resolve().parents[1] / "parser" / "fixtures" / "notes" / "fx_exec"


def _reader(data: bytes, reads: list[tuple[int, int]] | None = None) -> Callable[[int, int], bytes]:
    def read(offset: int, size: int) -> bytes:
        if reads is not None:
            reads.append((offset, size))
        return data[offset : offset + size]

    return read


def test_located_object_is_answered_after_its_bytes_are_checked(
    cached: tuple[ParserChild, ParseCache],
) -> None:
    pc, cache = cached
    data = NOTES_OBJECT.read_bytes()
    helper = notes_helper("fx_exec", 0x7F0000000000)
    first_reads: list[tuple[int, int]] = []
    first = pc.locate_notes(helper, len(data), _reader(data, first_reads), requester=PARENT)
    sent = _requests(pc)
    again_reads: list[tuple[int, int]] = []
    again = pc.locate_notes(helper, len(data), _reader(data, again_reads), requester=FORK_CHILD)
    assert again == first and _requests(pc) == sent and cache.hits == 1
    assert again_reads == first_reads  # the parser's reads, replayed and compared
    # one byte the parser read differs in the other object: parsed again
    offset, size = first_reads[-1]
    changed = bytearray(data)
    changed[offset + size - 1] ^= 0xFF
    with contextlib.suppress(RequestRejected):
        pc.locate_notes(helper, len(data), _reader(bytes(changed)), requester=OTHER)
    assert _requests(pc) == sent + 1
    # a byte it did not read may differ: the answer is the same, from the cache
    unread = next(i for i in range(len(data)) if not any(o <= i < o + s for o, s in first_reads))
    other = bytearray(data)
    other[unread] ^= 0xFF
    assert pc.locate_notes(helper, len(data), _reader(bytes(other)), requester=OTHER) == first
    assert _requests(pc) == sent + 1


def test_locate_of_the_same_requester_or_another_helper_goes_to_the_parser(
    cached: tuple[ParserChild, ParseCache],
) -> None:
    pc, _ = cached
    data = NOTES_OBJECT.read_bytes()
    helper = notes_helper("fx_exec", 0x7F0000000000)
    pc.locate_notes(helper, len(data), _reader(data), requester=PARENT)
    sent = _requests(pc)
    pc.locate_notes(helper, len(data), _reader(data), requester=PARENT)
    pc.locate_notes(
        notes_helper("fx_exec", 0x7F0000001000), len(data), _reader(data), requester=FORK_CHILD
    )
    pc.locate_notes(helper, len(data), _reader(data), requester=FORK_CHILD, dof=True)
    assert _requests(pc) == sent + 3


def test_a_result_heavy_in_argument_bytes_is_not_kept() -> None:
    """A small DOF that decodes into megabytes of argument types (docs/security.md) stays
    out of the cache: its bound counts bytes, not only records."""
    cache = ParseCache(max_bytes=1 << 20)
    pc = ParserChild(limits=ParseLimits(), timeout=10, cache=cache)
    try:
        heavy_types = [f"struct type_{i:03d}_" + "x" * 100 for i in range(200)]
        probes = [
            ProbeSpec("main", f"p{i}", [0x10 * (i + 1)], native=heavy_types) for i in range(20)
        ]
        heavy = build_dof([ProviderSpec("heavy", probes)]).data
        result = pc.parse_result(HELPER, heavy, requester=PARENT)
        assert len(result.records) < cache.max_records // 4  # few records, many bytes
        sent = _requests(pc)
        pc.parse_result(HELPER, heavy, requester=FORK_CHILD)
        assert _requests(pc) == sent + 1 and len(cache) == 0
        # an ordinary result fits, and the bytes held are counted
        pc.parse_result(HELPER, _dof(), requester=PARENT)
        assert len(cache) == 1 and 0 < cache.held_bytes <= cache.max_bytes
    finally:
        pc.stop()
