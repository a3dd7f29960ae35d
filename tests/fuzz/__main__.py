"""``python -m tests.fuzz``: the long fuzz run (or regenerate the seed corpus).

    .venv/bin/python -m tests.fuzz --seconds 600 [--seed N] [--findings DIR] [--no-compare]
    .venv/bin/python -m tests.fuzz --make-corpus
    .venv/bin/python -m tests.fuzz --notes --seconds 600 [--seed N] [--findings DIR]
    .venv/bin/python -m tests.fuzz --make-notes-corpus

Prints the seed first (rerun with ``--seed`` to reproduce), then a progress
line every 10 s and a summary: executions, executions/s, accepted/rejected,
the most frequent rejection messages, and every finding (also saved under
``--findings``, default ``/tmp/dtprobed-fuzz-findings``).  Exit status 1 if
there was any finding.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

from tests.fuzz.corpus_build import make_corpus
from tests.fuzz.harness import CORPUS_DIR, Fuzzer
from tests.fuzz.notes_corpus_build import make_notes_corpus
from tests.fuzz.notes_harness import NOTES_CORPUS_DIR, NotesFuzzer


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--findings", type=Path, default=Path("/tmp/dtprobed-fuzz-findings"))
    p.add_argument("--no-compare", action="store_true", help="skip the in-process comparison")
    p.add_argument("--make-corpus", action="store_true", help="rewrite the generated seed corpus")
    p.add_argument("--notes", action="store_true",
                   help="fuzz the ELF-notes path (LocateNotes, then ParseNoteBlocks)")  # fmt: skip
    p.add_argument("--make-notes-corpus", action="store_true", help="rewrite the notes corpus")
    args = p.parse_args()
    if args.make_corpus:
        for path in make_corpus(CORPUS_DIR):
            print(path)
        return 0
    if args.make_notes_corpus:
        for path in make_notes_corpus(NOTES_CORPUS_DIR):
            print(path)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(
        f"seed {seed}  (reproduce: python -m tests.fuzz --seed {seed} --seconds {args.seconds:g})"
    )
    fuzzer: Fuzzer | NotesFuzzer
    if args.notes:
        fuzzer = NotesFuzzer(seed=seed, compare=not args.no_compare, findings_dir=args.findings)
    else:
        fuzzer = Fuzzer(seed=seed, compare=not args.no_compare, findings_dir=args.findings)
    start = time.monotonic()
    try:
        while (elapsed := time.monotonic() - start) < args.seconds:
            stats = fuzzer.run(seconds=min(10.0, args.seconds - elapsed))
            rate = stats.executions / (time.monotonic() - start)
            print(f"{time.monotonic() - start:7.1f} s  {stats.executions} execs  {rate:.0f}/s  "
                  f"{len(stats.findings)} findings", flush=True)  # fmt: skip
    finally:
        fuzzer.close()
    stats = fuzzer.stats
    elapsed = time.monotonic() - start
    print(f"\n{stats.executions} executions in {elapsed:.1f} s: {stats.executions / elapsed:.0f}/s; "
          f"accepted {stats.accepted}, rejected {stats.rejected}, "
          f"{len(stats.errors)} distinct rejection messages")  # fmt: skip
    if isinstance(fuzzer, NotesFuzzer):
        ns = fuzzer.stats
        print(f"notes: {ns.requests} requests (LocateNotes + ParseNoteBlocks), {ns.located} "
              f"located, {ns.direct} direct block mutations, {ns.reads} ReadAt")  # fmt: skip
    for message, n in stats.errors.most_common(15):
        print(f"  {n:6d}  {message}")
    print(f"findings: {len(stats.findings)}")
    for f in stats.findings:
        print(f"  {f.what}\n    made by: {f.case.how}")
    return 1 if stats.findings else 0


if __name__ == "__main__":
    sys.exit(main())
