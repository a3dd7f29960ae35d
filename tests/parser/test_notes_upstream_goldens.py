"""Our notes parser against upstream's real C dtprobed 2.0.7: the parsed stash files, byte for byte.

``tests/golden/upstream-2.0.7/`` holds state trees that upstream's daemon wrote
for the fixtures of ``tests/parser/fixtures/notes/`` (``tests/realdtrace/
upstream_goldens.sh``).  For every ``dof-pid/PID/DEV-INO`` directory there
whose ``dh`` names a fixture, locate the notes in that fixture (``LocateNotes``:
the base it derives must be the stored ``dh``'s ``dofhp_addr``), parse the two
blocks cut from it (``ParseNoteBlocks``) and encode each probe the way our
stash writer does: the set of ``parsed/`` files and every file's bytes must
be identical to upstream's, tracepoint order included (upstream: first
validated, then the others in reverse; the notes grammar allows any order of
unique addresses).  The goldens and fixtures are committed: if the folder is
missing the tests fail with one line saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from common.grammar import check_stream
from common.records import NotesLocation, ResultRecord
from common.stash_format import VERSION_BYTES, decode_probe_file, encode_probe_file
from parserd import elf_notes
from tests.parser.elf_build import cut, locate, parse_blocks, with_base

GOLDENS = Path(__file__).parents[1] / "golden" / "upstream-2.0.7"
FIXTURES = Path(__file__).parent / "fixtures" / "notes"


def _registrations() -> list[Path]:
    if not GOLDENS.is_dir() or not FIXTURES.is_dir():
        return []
    out = []
    for dh in sorted(GOLDENS.glob("*/run*/*/tree/stash/dof-pid/*/*/dh")):
        module = dh.read_bytes()[:64].split(b"\0", 1)[0].decode("utf-8", "replace")
        if dh.parent.is_symlink():
            continue  # the generation symlink: the same directory again
        if (FIXTURES / module).is_file() and (dh.parent / "parsed").is_dir():
            out.append(dh.parent)
    return out


REGISTRATIONS = _registrations()
#: the upstream goldens hold this many notes registrations of the fixtures (README there)
MIN_REGISTRATIONS = 10


def _require_goldens() -> None:
    if not GOLDENS.is_dir():
        where = GOLDENS.relative_to(Path(__file__).parents[2])
        pytest.fail(f"missing {where}: upstream goldens not committed", pytrace=False)


def _both_phases(dh: bytes, obj: bytes) -> list[ResultRecord]:
    (loc,) = locate(obj, dh=dh)
    assert isinstance(loc, NotesLocation), loc
    assert loc.base == int.from_bytes(dh[64:72], "little")  # what upstream stored
    return parse_blocks(cut(obj, loc), dh=with_base(dh, loc.base))


def test_the_goldens_are_there() -> None:
    _require_goldens()
    assert len(REGISTRATIONS) >= MIN_REGISTRATIONS, REGISTRATIONS


@pytest.mark.parametrize(
    "directory", REGISTRATIONS or [GOLDENS], ids=lambda p: str(p.relative_to(GOLDENS))
)
def test_parsed_files_equal_upstreams(directory: Path) -> None:
    _require_goldens()
    dh = (directory / "dh").read_bytes()
    module = dh[:64].split(b"\0", 1)[0].decode()
    obj = (FIXTURES / module).read_bytes()
    records = _both_phases(dh, obj)
    checker = check_stream(records, notes=True)
    ours = {
        pp.spec: encode_probe_file(pp.provider, pp.probe, pp.args, pp.tracepoints)
        for pp in checker.probes
    }
    parsed = directory / "parsed"
    theirs = {p.name: p.read_bytes() for p in parsed.iterdir() if p.name != "version"}
    assert (parsed / "version").read_bytes() == VERSION_BYTES
    assert sorted(ours) == sorted(theirs)
    for spec, data in theirs.items():
        assert ours[spec] == data, spec  # byte-identical, tracepoint order included


def test_the_hash_table_model_predicts_upstreams_tracepoint_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Evidence for the emission-order finding (parserd/elf_notes.py docstring).

    Upstream writes a probe's tracepoints in validation order as a list whose
    head is the first tracepoint validated, each later one inserted right after
    the head: first, then the rest in reverse.  Validation walks ``prbmap``; our
    ``_Htab`` model of ``dt_htab`` gives that walk.  It must predict the order of
    every TRACEPOINT in every upstream file exactly.
    """
    walked: list[elf_notes._Site] = []
    real_iter = elf_notes._Htab.__iter__

    def iterate(self: elf_notes._Htab) -> Iterator[object]:
        for entry in real_iter(self):
            if isinstance(entry, elf_notes._Site):
                walked.append(entry)
            yield entry

    _require_goldens()
    monkeypatch.setattr(elf_notes._Htab, "__iter__", iterate)
    checked = 0
    for directory in REGISTRATIONS:
        walked.clear()
        dh = (directory / "dh").read_bytes()
        module = dh[:64].split(b"\0", 1)[0].decode()
        obj = (FIXTURES / module).read_bytes()
        base = int.from_bytes(dh[64:72], "little")
        _both_phases(dh, obj)
        by_probe: dict[tuple[bytes, bytes, bytes], list[elf_notes._Site]] = {}
        for site in walked:
            by_probe.setdefault((site.prv, site.fun, site.prb), []).append(site)
        for (prv, fun, prb), sites in by_probe.items():
            spec = f"{prv.decode()}:{module}:{fun.decode()}:{prb.decode()}"
            f = decode_probe_file((directory / "parsed" / spec).read_bytes())
            predicted = [sites[0], *reversed(sites[1:])]
            assert [(t.addr, t.is_enabled) for t in f.tracepoints] == [
                (base + s.off, s.enabled) for s in predicted
            ], spec
            checked += 1
    assert checked >= 10
