"""The record-stream grammar table."""

from __future__ import annotations

import itertools
import random

import pytest

from common.errors import ProtocolError
from common.grammar import StreamChecker, check_stream
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


def _outcome(recs: list[ResultRecord], cuts: list[int] | None, notes: bool) -> tuple[object, ...]:
    """What a checker ends with: fed one record at a time (*cuts* None) or in slices."""
    checker = StreamChecker(max_probes=6, max_tracepoints=9, max_providers=2, notes=notes)
    try:
        if cuts is None:
            for rec in recs:
                checker.feed(rec)
        else:
            bounds = [0, *cuts, len(recs)]
            for start, stop in itertools.pairwise(bounds):
                checker.feed_all(recs, start, stop)
    except ProtocolError as err:
        return ("refused", str(err))
    return ("fed", checker.done, checker.error, checker.probes, checker.providers)


def _random_stream(rng: random.Random) -> list[ResultRecord]:
    recs: list[ResultRecord] = []
    for pv in range(rng.randint(0, 3)):
        n = rng.randint(0, 3)
        recs.append(Provider(name=f"v{pv}", nprobes=n))
        for i in range(n):
            nargc = rng.choice((0, 0, 1, 2))
            xargc = rng.choice((0, 1)) if nargc else 0
            ntp = rng.randint(1, 3)
            recs.append(probe(f"p{i}" if rng.random() < 0.9 else "p0", ntp, nargc, xargc))
            if nargc:
                recs.append(ArgsNative(args=["int"] * nargc))
            if xargc:
                recs += [ArgsXlat(args=["long"] * xargc), ArgsMap(map=[rng.randint(0, nargc)])]
            addrs = sorted(rng.sample(range(1, 40), ntp))
            recs += [tp(a, en=k >= ntp - rng.randint(0, 1)) for k, a in enumerate(addrs)]
    recs.append(Eof())
    return recs


def _mutate(rng: random.Random, recs: list[ResultRecord]) -> list[ResultRecord]:
    out = list(recs)
    for _ in range(rng.randint(0, 2)):
        i = rng.randrange(len(out))
        match rng.randrange(5):
            case 0:
                del out[i]
                if not out:
                    out.append(Eof())
            case 1:
                out.insert(i, out[rng.randrange(len(out))])
            case 2:
                j = rng.randrange(len(out))
                out[i], out[j] = out[j], out[i]
            case 3:
                out[i] = tp(rng.randint(0, 40), rng.random() < 0.5)
            case 4:
                out.insert(i, Err(errno=22, message="no"))
    return out


@pytest.mark.parametrize("notes", [False, True])
def test_feeding_whole_probes_ends_as_feeding_records_one_by_one(notes: bool) -> None:
    """feed_all's fast path (a probe at a time) accepts, refuses and reports exactly as
    feed does, wherever the slices are cut, on valid and broken streams alike."""
    rng = random.Random(1729 + notes)
    outcomes = set()
    for _ in range(3000):
        recs = _mutate(rng, _random_stream(rng))
        expected = _outcome(recs, None, notes)
        outcomes.add(expected[0])
        for cuts in ([], sorted(rng.sample(range(len(recs) + 1), min(3, len(recs) + 1)))):
            assert _outcome(recs, cuts, notes) == expected, (recs, cuts)
    assert outcomes == {"refused", "fed"}
