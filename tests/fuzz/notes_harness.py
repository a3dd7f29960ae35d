"""Drive the sandboxed parser child with ELF-notes fuzz inputs (ParseNotes + ReadAt answers).

Invariants per input (a breach is a *finding*):

1. the child answers within the timeout and stays alive (not killed by its
   sandbox, not exiting 70 because the parser raised);
2. the answer is one ``Err``, or ``[ObjectBase] PROVIDER … EOF`` within the
   record grammar (:func:`common.grammar.check_stream`) and the limits;
3. every ``ReadAt`` lies inside the file, is the last record of its batch,
   and the request stays within ``max_object_reads`` / ``max_object_bytes``;
4. the answer equals :func:`parserd.elf_notes.parse_notes` run in this process.

Uses :class:`tests.parser.notes_pipe.NotesPipe` (raw frames), not dtprobed's
host side.  Findings are written as ``<n>.elf`` + ``<n>.dh`` + ``<n>.txt``.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common.dof_build import build_helper
from common.errors import ProtocolError
from common.grammar import check_stream
from common.limits import ParseLimits
from common.records import Eof, Err, Provider
from parserd.elf_notes import parse_notes
from tests.fuzz.notes_generator import NotesCase, generate_notes
from tests.parser.notes_pipe import ChildDied, NotesPipe

NOTES_CORPUS_DIR = Path(__file__).parent / "corpus_notes"
REAL_FIXTURES = Path(__file__).parents[1] / "parser" / "fixtures" / "notes"
#: Small limits so that the limit checks are reached by small inputs too.
NOTES_FUZZ_LIMITS = ParseLimits(
    max_providers=4, max_probes=32, max_tracepoints=96, max_object_reads=12,
    max_object_bytes=1 << 20,
)  # fmt: skip


def load_notes_corpus(directory: Path = NOTES_CORPUS_DIR) -> list[tuple[str, bytes, bytes]]:
    """(name, helper, object) for every ``*.elf`` (a ``.dh`` beside it is its helper), plus the
    real dtrace 2.0.7 objects of ``tests/parser/fixtures/notes`` when they are there."""
    out = []
    for path in sorted(directory.glob("*.elf")):
        dh = path.with_suffix(".dh")
        helper = dh.read_bytes() if dh.exists() else build_helper(b"fuzz.so", 0x7F0000000000)
        out.append((path.name, helper, path.read_bytes()))
    if (REAL_FIXTURES / "SHA256SUMS").exists():
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
    executions: int = 0
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
        try:
            answer = self.pipe.parse_notes(case.helper, case.data)
        except (ChildDied, TimeoutError) as err:
            self._finding(case, f"{type(err).__name__}: {err}")
            self._restart()
            return
        records = answer.records
        self.stats.reads += len(answer.reads)
        if len(answer.reads) > self.limits.max_object_reads or (
            sum(size for _, size in answer.reads) > self.limits.max_object_bytes
        ):
            self._finding(case, f"read budget exceeded: {len(answer.reads)} reads")
        end = records[-1]
        if isinstance(end, Err):
            if len(records) != 1:
                self._finding(case, f"records before Err: {records[:3]!r}")
            self.stats.rejected += 1
            self.stats.errors[_shape(end.message)] += 1
        else:
            assert isinstance(end, Eof)
            self.stats.accepted += 1
            try:
                check_stream(
                    records,
                    object_base=True,
                    max_probes=self.limits.max_probes,
                    max_tracepoints=self.limits.max_tracepoints,
                )
            except ProtocolError as err:
                self._finding(case, f"grammar: {err}")
            nprov = sum(isinstance(r, Provider) for r in records)
            if nprov > self.limits.max_providers:
                self._finding(case, f"{nprov} providers")
        if self.compare:
            data = case.data
            expected = parse_notes(
                case.helper, len(data), lambda o, s: data[o : o + s], self.limits
            )
            if records != expected:
                self._finding(case, f"child answer differs from in-process parse: {records[:3]!r}")

    def _finding(self, case: NotesCase, what: str) -> None:
        self.stats.findings.append(Finding(case, what))
        self.log.error("FINDING (seed %d, input %d): %s [%s]", self.seed,
                       self.stats.executions, what, case.how)  # fmt: skip
        if self.findings_dir is not None:
            self.findings_dir.mkdir(parents=True, exist_ok=True)
            stem = self.findings_dir / f"notes-seed{self.seed}-{self.stats.executions}"
            stem.with_suffix(".elf").write_bytes(case.data)
            stem.with_suffix(".dh").write_bytes(case.helper)
            stem.with_suffix(".txt").write_text(f"seed {self.seed}\n{case.how}\n{what}\n")

    def run(self, *, count: int | None = None, seconds: float | None = None) -> Stats:
        end = time.monotonic() + seconds if seconds is not None else None
        done = 0
        while (count is None or done < count) and (end is None or time.monotonic() < end):
            self.check(generate_notes(self.rng, self.corpus))
            done += 1
        return self.stats
