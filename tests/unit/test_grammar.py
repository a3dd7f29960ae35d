"""The record-stream grammar table."""

from __future__ import annotations

import pytest

from common.errors import ProtocolError
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


def probe(name: str = "p", ntp: int = 1, nargc: int = 0, xargc: int = 0) -> Probe:
    return Probe(mod="m", fun="f", prb=name, ntp=ntp, nargc=nargc, xargc=xargc)


def tp(addr: int, en: bool = False) -> Tracepoint:
    return Tracepoint(addr=addr, is_enabled=en)


def test_valid_stream() -> None:
    recs: list[ResultRecord] = [
        Provider(name="a", nprobes=2),
        probe("x", ntp=2), tp(1), tp(0, True),
        probe("y", nargc=2, xargc=1),
        ArgsNative(args=["int", "long"]), ArgsXlat(args=["int"]), ArgsMap(map=[1]), tp(5),
        Provider(name="b", nprobes=0),
        Eof(),
    ]  # fmt: skip
    checker = check_stream(recs)
    assert [p.spec for p in checker.probes] == ["a:m:f:x", "a:m:f:y"]
    assert checker.error is None


def test_err_alone() -> None:
    assert check_stream([Err(errno=22, message="no")]).error == Err(errno=22, message="no")


@pytest.mark.parametrize(
    ("recs", "message"),
    [
        ([Provider(name="a", nprobes=1), Eof()], "unexpected Eof"),
        ([Provider(name="a", nprobes=1), probe(), tp(1), probe("z"), tp(1), Eof()], "unexpected Probe"),
        ([Provider(name="a", nprobes=1), probe(), Err(errno=22, message="x")], "unexpected Err"),
        ([Provider(name="a", nprobes=1), probe(ntp=2), tp(2), tp(1), Eof()], "not above"),
        ([Provider(name="a", nprobes=1), probe(ntp=2), tp(2, True), tp(3), Eof()], "after an is-enabled"),
        ([Provider(name="a", nprobes=2), probe(), tp(1), probe(), tp(1), Eof()], "duplicate probe"),
        ([Provider(name="a", nprobes=1), probe(nargc=1), tp(1), Eof()], "unexpected Tracepoint"),
        ([Provider(name="a", nprobes=1), probe(nargc=2), ArgsNative(args=["int"]), tp(1), Eof()], "nargc is 2"),
        (
            [Provider(name="a", nprobes=1), probe(nargc=1, xargc=1), ArgsNative(args=["i"]),
             ArgsXlat(args=["i"]), ArgsMap(map=[1]), tp(1), Eof()],
            "not below nargc",
        ),
        ([Eof(), Eof()], "unexpected Eof"),
        ([Provider(name="a", nprobes=0)], "ended early"),
    ],
)  # fmt: skip
def test_bad_streams(recs: list, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ProtocolError, match=message):
        check_stream(recs)


def test_limits() -> None:
    recs: list[ResultRecord] = [
        Provider(name="a", nprobes=2),
        probe("x"),
        tp(1),
        probe("y"),
        tp(1),
        Eof(),
    ]
    with pytest.raises(ProtocolError, match="more than 1 probes"):
        check_stream(recs, max_probes=1)
    with pytest.raises(ProtocolError, match="more than 1 tracepoints"):
        check_stream(recs, max_tracepoints=1)


def test_notes_streams_take_the_dof_order_too() -> None:
    """A notes stream needs unique addresses only, so DOF's order is one of the allowed ones."""
    recs: list[ResultRecord] = [Provider(name="a", nprobes=1), probe(ntp=3), tp(1), tp(2),
                                tp(0, True), Eof()]  # fmt: skip
    assert check_stream(recs, notes=True).probes == check_stream(recs).probes
    reordered = [*recs[:2], tp(0, True), tp(2), tp(1), Eof()]
    assert len(check_stream(reordered, notes=True).probes) == 1
    with pytest.raises(ProtocolError, match="after an is-enabled"):
        check_stream(reordered)
