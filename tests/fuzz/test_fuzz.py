"""The short fuzz run of the test suite, the seed corpus, and regressions found by fuzzing.

The long run is ``.venv/bin/python -m tests.fuzz --seconds N`` (see ``__main__.py``).
Set ``DTPROBED_FUZZ_SEED`` to rerun the short run with another seed; the seed
in use is printed (``pytest -s`` shows it, and a failure message repeats it).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from common.records import Eof, Err
from tests.fuzz.generator import Case, generate
from tests.fuzz.harness import Fuzzer, load_corpus

SHORT_RUN = 400
DEFAULT_SEED = 4242


@pytest.fixture
def fuzzer() -> Iterator[Fuzzer]:
    seed = int(os.environ.get("DTPROBED_FUZZ_SEED", DEFAULT_SEED))
    print(f"fuzz seed {seed}")
    f = Fuzzer(seed=seed, timeout=5.0)
    try:
        yield f
    finally:
        f.close()


def test_seed_corpus_is_committed_and_varied() -> None:
    corpus = load_corpus()
    assert len(corpus) >= 30
    names = {name for name, _, _ in corpus}
    assert "libusdt-3probes.dof" in names
    assert all(len(dof) < 64 * 1024 for _, _, dof in corpus)


def test_seed_corpus_through_the_child(fuzzer: Fuzzer) -> None:
    for name, helper, dof in load_corpus():
        fuzzer.check(Case(helper, dof, name))
    stats = fuzzer.stats
    assert not stats.findings, [f.what for f in stats.findings]
    # the corpus holds accepted DOF and mutants that fail several different rules
    assert stats.accepted >= 10 and stats.rejected >= 10 and len(stats.errors) >= 8


@pytest.mark.timeout(60)
def test_short_fuzz_run_keeps_every_invariant(fuzzer: Fuzzer) -> None:
    stats = fuzzer.run(count=SHORT_RUN)
    assert stats.executions == SHORT_RUN
    assert not stats.findings, f"seed {fuzzer.seed}: " + "; ".join(
        f"{f.what} [{f.case.how}]" for f in stats.findings
    )
    # the generator reaches both outcomes and many distinct rules, or the run proves little
    assert stats.accepted >= SHORT_RUN // 20
    assert stats.rejected >= SHORT_RUN // 4
    assert len(stats.errors) >= 25, stats.errors


def test_generator_is_reproducible_from_its_seed() -> None:
    corpus = [(h, d) for _, h, d in load_corpus()]
    a, b = random.Random(99), random.Random(99)
    assert [generate(a, corpus).dof for _ in range(30)] == [
        generate(b, corpus).dof for _ in range(30)
    ]


def test_outcomes_are_single_end_records(fuzzer: Fuzzer) -> None:
    """Spot check of invariant 1 at the record level (ParserChild enforces it for every input)."""
    rng = random.Random(fuzzer.seed)
    for _ in range(50):
        case = generate(rng, fuzzer.corpus)
        records = fuzzer.child.parse_records(case.helper, case.dof)
        ends = [r for r in records if isinstance(r, Eof | Err)]
        assert ends == [records[-1]]
