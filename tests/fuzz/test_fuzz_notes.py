"""The ELF-notes fuzz target in the suite: the fixed seed corpus replayed, and a short seeded run.

Every ``*.elf`` seed (and real fixture) goes through both exchanges
(LocateNotes with ReadAt answers, then ParseNoteBlocks with the located
blocks); every ``*.blocks`` seed is one direct ParseNoteBlocks.

The long run is ``.venv/bin/python -m tests.fuzz --notes --seconds N``.  Set
``DTPROBED_FUZZ_SEED`` to rerun the short run with another seed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from tests.fuzz.notes_generator import NotesCase, generate_notes
from tests.fuzz.notes_harness import NotesFuzzer, load_blocks_corpus, load_notes_corpus

SHORT_RUN = 400
DEFAULT_SEED = 4242


@pytest.fixture
def fuzzer() -> Iterator[NotesFuzzer]:
    seed = int(os.environ.get("DTPROBED_FUZZ_SEED", DEFAULT_SEED))
    print(f"notes fuzz seed {seed}")
    f = NotesFuzzer(seed=seed, timeout=5.0)
    try:
        yield f
    finally:
        f.close()


def test_notes_corpus_is_committed_and_varied() -> None:
    corpus = [c for c in load_notes_corpus() if not c[0].startswith("fixture:")]
    assert len(corpus) >= 40
    assert all(len(data) < 64 * 1024 for _, _, data in corpus)


def test_notes_corpus_through_the_child(fuzzer: NotesFuzzer) -> None:
    for name, helper, data in load_notes_corpus():
        fuzzer.check(NotesCase(helper, data, name))
    stats = fuzzer.stats
    assert not stats.findings, [f.what for f in stats.findings]
    assert stats.accepted >= 10 and stats.rejected >= 10 and len(stats.errors) >= 8
    assert stats.located >= 20 and stats.requests >= stats.executions + stats.located


def test_blocks_corpus_through_the_child(fuzzer: NotesFuzzer) -> None:
    seeds = load_blocks_corpus()
    assert len(seeds) >= 10
    for name, seed in seeds:
        case = NotesCase(seed.helper, b"", name)
        fuzzer.check_blocks(case, seed.helper, seed.notes_addr, seed.notes, seed.rodata_addr,
                            seed.rodata)  # fmt: skip
    stats = fuzzer.stats
    assert not stats.findings, [f.what for f in stats.findings]
    assert stats.accepted >= 1 and stats.rejected >= 5
    assert stats.requests == len(seeds)


@pytest.mark.timeout(120)
def test_short_notes_fuzz_run_keeps_every_invariant(fuzzer: NotesFuzzer) -> None:
    stats = fuzzer.run(count=SHORT_RUN)
    assert stats.executions == SHORT_RUN
    assert not stats.findings, f"seed {fuzzer.seed}: " + "; ".join(
        f"{f.what} [{f.case.how}]" for f in stats.findings
    )
    assert stats.accepted >= SHORT_RUN // 20
    assert stats.rejected >= SHORT_RUN // 4
    assert len(stats.errors) >= 25, stats.errors
    assert stats.reads >= SHORT_RUN  # the ReadAt exchange is exercised, not bypassed
    assert stats.located >= SHORT_RUN // 4  # ParseNoteBlocks of located blocks
    assert stats.direct >= SHORT_RUN // 20  # and of directly mutated blocks


def test_notes_generator_is_reproducible_from_its_seed() -> None:
    corpus = [(h, d) for _, h, d in load_notes_corpus()]
    a, b = random.Random(99), random.Random(99)
    assert [generate_notes(a, corpus).data for _ in range(30)] == [
        generate_notes(b, corpus).data for _ in range(30)
    ]
