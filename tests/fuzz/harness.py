"""Drive the sandboxed parser child with fuzz inputs and check the invariants on every answer.

Invariants per input (a breach is a *finding*):

1. the child answers: records ending in exactly one ``Eof`` or ``Err``, every
   record within the schema and the stream within the grammar and the limits
   — :class:`~dtprobed.children.parser.ParserChild` checks all of that and
   raises ``ChildFailed`` otherwise;
2. no request exceeds the timeout (``ChildTimeout``);
3. the child never dies (``ChildFailed``/``SandboxViolation``; the child
   exits 70 after a Log record if the parser raised);
4. the child's answer equals :func:`parserd.dof_parse.parse_dof` run in this
   process (the sandbox changes nothing), when ``compare`` is on.

Caveat: the child is replaced every 10000 requests and imports the parser
afresh, while this process keeps the module it imported at start; editing
``parserd/dof_parse.py`` during a long run therefore shows up as invariant 4
findings from that point on.  Re-check findings with the current code.

Findings are written to *findings_dir* as ``<n>.dof`` + ``<n>.dh`` + ``<n>.txt``
(how the input was made, the seed, and what broke) so they can become
regression tests.
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
from common.errors import ChildFailed
from common.limits import ParseLimits
from common.records import Eof, Err
from dtprobed.children.parser import ParserChild
from parserd.dof_parse import parse_dof
from tests.fuzz.generator import Case, generate

CORPUS_DIR = Path(__file__).parent / "corpus"
#: Small limits so the limit checks are reached by small inputs too.
FUZZ_LIMITS = ParseLimits(max_dof_size=1 << 20, max_providers=4, max_probes=32, max_tracepoints=96)


def load_corpus(directory: Path = CORPUS_DIR) -> list[tuple[str, bytes, bytes]]:
    """(name, helper, dof) for every ``*.dof``; a ``.dh`` beside it is its helper."""
    out = []
    for path in sorted(directory.glob("*.dof")):
        dh = path.with_suffix(".dh")
        helper = dh.read_bytes() if dh.exists() else build_helper()
        out.append((path.name, helper, path.read_bytes()))
    return out


def _shape(message: str) -> str:
    """A rejection message with its numbers and quoted names blanked, for counting rules hit."""
    message = re.sub(r'"[^"]*"', '"…"', message)
    return re.sub(r"\b(0x)?[0-9a-fA-F]*\d[0-9a-fA-F]*\b", "N", message)[:80]


@dataclass
class Finding:
    case: Case
    what: str


@dataclass
class Stats:
    executions: int = 0
    accepted: int = 0
    rejected: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)


class Fuzzer:
    def __init__(
        self,
        *,
        seed: int,
        timeout: float = 5.0,
        compare: bool = True,
        findings_dir: Path | None = None,
        limits: ParseLimits = FUZZ_LIMITS,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.limits = limits
        self.compare = compare
        self.findings_dir = findings_dir
        self.log = logging.getLogger("fuzz")
        self.child = ParserChild(limits=limits, timeout=timeout, log=self.log)
        self.corpus = [(h, d) for _, h, d in load_corpus()]
        self.stats = Stats()

    def close(self) -> None:
        self.child.stop()

    def check(self, case: Case) -> None:
        """Run one input through the child; record the outcome or the finding."""
        self.stats.executions += 1
        try:
            records = self.child.parse_records(case.helper, case.dof)
        except ChildFailed as err:
            self._finding(case, f"{type(err).__name__}: {err}")
            return
        end = records[-1]
        if isinstance(end, Err):
            self.stats.rejected += 1
            self.stats.errors[_shape(end.message)] += 1
        else:
            assert isinstance(end, Eof)
            self.stats.accepted += 1
        if self.compare:
            expected = parse_dof(case.helper, case.dof, self.limits)
            if records != expected:
                self._finding(case, f"child answer differs from in-process parse: {records[:3]!r}")

    def _finding(self, case: Case, what: str) -> None:
        finding = Finding(case, what)
        self.stats.findings.append(finding)
        self.log.error("FINDING (seed %d, input %d): %s [%s]", self.seed,
                       self.stats.executions, what, case.how)  # fmt: skip
        if self.findings_dir is not None:
            self.findings_dir.mkdir(parents=True, exist_ok=True)
            stem = self.findings_dir / f"seed{self.seed}-{self.stats.executions}"
            stem.with_suffix(".dof").write_bytes(case.dof)
            stem.with_suffix(".dh").write_bytes(case.helper)
            stem.with_suffix(".txt").write_text(f"seed {self.seed}\n{case.how}\n{what}\n")

    def run(self, *, count: int | None = None, seconds: float | None = None) -> Stats:
        """Generated inputs until *count* are done or *seconds* have passed."""
        end = time.monotonic() + seconds if seconds is not None else None
        done = 0
        while (count is None or done < count) and (end is None or time.monotonic() < end):
            self.check(generate(self.rng, self.corpus))
            done += 1
        return self.stats
