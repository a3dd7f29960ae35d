"""Drive the sandboxed parser child with ELF-notes fuzz inputs through both exchanges.

Per input: ``LocateNotes`` with every ``ReadAt`` answered from the object's
bytes; when located, ``ParseNoteBlocks`` with the two blocks cut from the
object (what the host does); and, for a share of the located inputs
(:data:`DIRECT_SHARE`), one more ``ParseNoteBlocks`` with the blocks mutated
directly (:func:`~tests.fuzz.notes_generator.mutate_blocks`: bytes of either
block, the ``.rodata`` address), which no ELF header stands in front of.

Invariants per exchange (a breach is a *finding*):

1. the child answers within the timeout and stays alive (not killed by its
   sandbox, not exiting 70 because the parser raised);
2. ``LocateNotes`` answers one ``NotesLocation`` or one ``Err``
   (:func:`common.grammar.check_location`); a location lies inside the file,
   its notes 4-aligned, its blocks within ``max_object_bytes``;
   ``ParseNoteBlocks`` answers one ``Err`` or ``PROVIDER … EOF`` within the
   notes grammar (``check_stream(notes=True)``) and the limits;
3. every ``ReadAt`` lies inside the file, is the last record of its batch,
   comes only in a ``LocateNotes`` exchange, and the request stays within
   ``max_object_reads`` / ``max_object_bytes``;
4. each answer equals :func:`parserd.elf_notes.locate_notes` /
   :func:`~parserd.elf_notes.parse_note_blocks` run in this process.

Uses :class:`tests.parser.notes_pipe.NotesPipe` (raw frames), not dtprobed's
host side.  Findings are written as ``<n>.elf`` + ``<n>.dh`` + ``<n>.txt``
(and ``<n>.blocks``, msgpack ``[helper, notes_addr, notes, rodata_addr,
rodata]``, for a direct block mutation).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from common.dof_build import build_helper
from common.errors import ProtocolError
from common.grammar import check_location, check_stream
from common.limits import ParseLimits
from common.records import Err, NotesLocation, Provider, ResultRecord
from parserd.elf_notes import locate_notes, parse_note_blocks
from tests.fuzz.notes_generator import NotesCase, generate_notes, mutate_blocks
from tests.parser.notes_pipe import Answer, ChildDied, NotesPipe

#: Share of located inputs that also get a direct block mutation.
DIRECT_SHARE = 0.3

NOTES_CORPUS_DIR = Path(__file__).parent / "corpus_notes"
REAL_FIXTURES = Path(__file__).parents[1] / "parser" / "fixtures" / "notes"
#: Small limits so that the limit checks are reached by small inputs too.
NOTES_FUZZ_LIMITS = ParseLimits(
    max_providers=4, max_probes=32, max_tracepoints=96, max_object_reads=12,
    max_object_bytes=1 << 20,
)  # fmt: skip


class BlocksSeed(msgspec.Struct, array_like=True, frozen=True):
    """A ``*.blocks`` seed: one ParseNoteBlocks request's fields."""

    helper: bytes
    notes_addr: int
    notes: bytes
    rodata_addr: int
    rodata: bytes


def load_blocks_corpus(directory: Path = NOTES_CORPUS_DIR) -> list[tuple[str, BlocksSeed]]:
    """(name, seed) for every ``*.blocks`` file (direct ParseNoteBlocks inputs)."""
    dec = msgspec.msgpack.Decoder(BlocksSeed)
    return [(p.name, dec.decode(p.read_bytes())) for p in sorted(directory.glob("*.blocks"))]


def load_notes_corpus(directory: Path = NOTES_CORPUS_DIR) -> list[tuple[str, bytes, bytes]]:
    """(name, helper, object) for every ``*.elf`` (a ``.dh`` beside it is its helper), plus the
    real dtrace 2.0.7 objects of ``tests/parser/fixtures/notes`` when they are there."""
    out = []
    for path in sorted(directory.glob("*.elf")):
        dh = path.with_suffix(".dh")
        helper = dh.read_bytes() if dh.exists() else build_helper(b"fuzz.so", 0x7F0000000000)
        out.append((path.name, helper, path.read_bytes()))
    # the fixtures are committed: a missing SHA256SUMS is an error, not a smaller corpus
    for line in (REAL_FIXTURES / "SHA256SUMS").read_text().splitlines():
        name = line.split()[1]
        helper = build_helper(name.encode(), 0x7F0000000000)
        out.append((f"fixture:{name}", helper, (REAL_FIXTURES / name).read_bytes()))
    return out


def _shape(message: str) -> str:
    """A rejection message with the module prefix, numbers and quoted names blanked."""
    message = re.sub(r"^[^ ]*: ", "MOD: ", message)
    message = re.sub(r" section in .*$", " section in MOD", message)
    message = re.sub(r'"[^"]*"', '"…"', message)
    return re.sub(r"\b(0x)?[0-9a-fA-F]*\d[0-9a-fA-F]*\b", "N", message)[:80]


@dataclass
class Finding:
    case: NotesCase
    what: str


@dataclass
class Stats:
    """``executions``: inputs; ``requests``: exchanges with the child (1 to 3 per input)."""

    executions: int = 0
    requests: int = 0
    located: int = 0
    direct: int = 0
    accepted: int = 0
    rejected: int = 0
    reads: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)


class NotesFuzzer:
    def __init__(
        self,
        *,
        seed: int,
        timeout: float = 5.0,
        compare: bool = True,
        findings_dir: Path | None = None,
        limits: ParseLimits = NOTES_FUZZ_LIMITS,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.limits = limits
        self.timeout = timeout
        self.compare = compare
        self.findings_dir = findings_dir
        self.log = logging.getLogger("fuzz.notes")
        self.pipe = NotesPipe(limits, timeout=timeout)
        self.corpus = [(h, d) for _, h, d in load_notes_corpus()]
        self.stats = Stats()

    def close(self) -> None:
        self.pipe.close()

    def _restart(self) -> None:
        try:
            self.pipe.proc.kill()
            self.pipe.close()
        finally:
            self.pipe = NotesPipe(self.limits, timeout=self.timeout)

    def check(self, case: NotesCase) -> None:
        self.stats.executions += 1
        data = case.data
        try:
            self.stats.requests += 1
            answer = self.pipe.locate_notes(case.helper, data)
        except (ChildDied, TimeoutError) as err:
            self._finding(case, f"LocateNotes: {type(err).__name__}: {err}")
            self._restart()
            return
        loc = self._check_location(case, answer)
        if loc is None:
            return
        self.stats.located += 1
        helper = case.helper[:64] + loc.base.to_bytes(8, "little") + case.helper[72:]
        notes = data[loc.notes_offset : loc.notes_offset + loc.notes_size]
        rodata = data[loc.rodata_offset : loc.rodata_offset + loc.rodata_size]
        self.check_blocks(case, helper, loc.notes_addr, notes, loc.rodata_addr, rodata)
        if self.rng.random() < DIRECT_SHARE:
            self.stats.direct += 1
            other = self.rng.choice(self.corpus)[1] if self.corpus else b""
            notes, rodata, rodata_addr, how = mutate_blocks(
                self.rng, notes, rodata, loc.rodata_addr, other
            )
            direct = NotesCase(case.helper, case.data, f"{case.how} + direct {how}")
            self.check_blocks(direct, helper, loc.notes_addr, notes, rodata_addr, rodata,
                              save=True)  # fmt: skip

    def _check_location(self, case: NotesCase, answer: Answer) -> NotesLocation | None:
        limits = self.limits
        self.stats.reads += len(answer.reads)
        if len(answer.reads) > limits.max_object_reads or (
            sum(size for _, size in answer.reads) > limits.max_object_bytes
        ):
            self._finding(case, f"read budget exceeded: {len(answer.reads)} reads")
        try:
            loc = check_location(answer.records)
        except ProtocolError as err:
            self._finding(case, f"LocateNotes grammar: {err}")
            return None
        if self.compare:
            data = case.data
            expected = locate_notes(case.helper, len(data), lambda o, s: data[o : o + s], limits)
            if answer.records != expected:
                self._finding(case, f"LocateNotes differs from in-process: {answer.records!r}")
        if isinstance(loc, Err):
            self._rejected(loc)
            return None
        size = len(case.data)
        if (
            loc.notes_offset + loc.notes_size > size
            or loc.rodata_offset + loc.rodata_size > size
            or loc.notes_offset % 4
            or loc.notes_size + loc.rodata_size > limits.max_object_bytes
        ):
            self._finding(case, f"location outside the file or the budget: {loc!r}")
            return None
        return loc

    def _rejected(self, err: Err) -> None:
        self.stats.rejected += 1
        self.stats.errors[_shape(err.message)] += 1

    def check_blocks(
        self,
        case: NotesCase,
        helper: bytes,
        notes_addr: int,
        notes: bytes,
        rodata_addr: int,
        rodata: bytes,
        *,
        save: bool = False,
    ) -> None:
        """One ParseNoteBlocks exchange and its invariants."""
        blocks = (helper, notes_addr, notes, rodata_addr, rodata)
        try:
            self.stats.requests += 1
            answer = self.pipe.parse_note_blocks(*blocks)
        except (ChildDied, TimeoutError) as err:
            self._finding(case, f"ParseNoteBlocks: {type(err).__name__}: {err}", blocks)
            self._restart()
            return
        records: list[ResultRecord] = answer.records
        where = blocks if save else None
        end = records[-1]
        if isinstance(end, Err):
            if len(records) != 1:
                self._finding(case, f"records before Err: {records[:3]!r}", where)
            self._rejected(end)
        else:
            self.stats.accepted += 1
            try:
                check_stream(
                    records,
                    notes=True,
                    max_probes=self.limits.max_probes,
                    max_tracepoints=self.limits.max_tracepoints,
                )
            except ProtocolError as err:
                self._finding(case, f"grammar: {err}", where)
            nprov = sum(isinstance(r, Provider) for r in records)
            if nprov > self.limits.max_providers:
                self._finding(case, f"{nprov} providers", where)
        if self.compare:
            expected = parse_note_blocks(*blocks, self.limits)
            if records != expected:
                self._finding(case, f"ParseNoteBlocks differs from in-process: {records[:3]!r}",
                              where)  # fmt: skip

    def _finding(
        self,
        case: NotesCase,
        what: str,
        blocks: tuple[bytes, int, bytes, int, bytes] | None = None,
    ) -> None:
        self.stats.findings.append(Finding(case, what))
        self.log.error("FINDING (seed %d, input %d): %s [%s]", self.seed,
                       self.stats.executions, what, case.how)  # fmt: skip
        if self.findings_dir is not None:
            self.findings_dir.mkdir(parents=True, exist_ok=True)
            stem = self.findings_dir / f"notes-seed{self.seed}-{self.stats.executions}"
            stem.with_suffix(".elf").write_bytes(case.data)
            stem.with_suffix(".dh").write_bytes(case.helper)
            stem.with_suffix(".txt").write_text(f"seed {self.seed}\n{case.how}\n{what}\n")
            if blocks is not None:
                stem.with_suffix(".blocks").write_bytes(msgspec.msgpack.encode(BlocksSeed(*blocks)))

    def run(self, *, count: int | None = None, seconds: float | None = None) -> Stats:
        end = time.monotonic() + seconds if seconds is not None else None
        done = 0
        while (count is None or done < count) and (end is None or time.monotonic() < end):
            self.check(generate_notes(self.rng, self.corpus))
            done += 1
        return self.stats
