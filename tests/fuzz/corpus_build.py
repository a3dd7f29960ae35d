"""The committed seed corpus (``tests/fuzz/corpus/``): regenerate with ``python -m tests.fuzz --make-corpus``.

A few dozen small DOF files: valid ones of every shape the model can make
(v1/v2/v3, several providers, arguments with translation, is-enabled offsets,
relocations), each followed by a few targeted mutants that fail different
rules, plus the real libusdt fixture (copied from ``shared/fixtures``, not
generated).  Byte-level mutation starts from these.
"""

from __future__ import annotations

import random
from pathlib import Path

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, many_probes_dof
from tests.fuzz.generator import random_model, targeted

CORPUS_SEED = 20240601


def make_corpus(directory: Path) -> list[Path]:
    rng = random.Random(CORPUS_SEED)
    written = []

    def put(name: str, data: bytes) -> None:
        path = directory / f"{name}.dof"
        path.write_bytes(data)
        written.append(path)

    args = ProbeSpec("fn", "args", [0x20, 0x10], enoffsets=[0x8], native=["int", "char *"],
                     xlat=["long"], argmap=[1])  # fmt: skip
    put("one-provider", build_dof([ProviderSpec("one", [ProbeSpec("fn", "p", [4])])]).data)
    put("args-v3-reloc", build_dof([ProviderSpec("v3", [args], relocate=True)]).data)
    put("v2-isenabled-dropped", build_dof([ProviderSpec("v2", [args])], version=2).data)
    put("v1", build_dof([ProviderSpec("v1", [ProbeSpec("fn", "p", [4, 8])])], version=1).data)
    put("two-providers", build_dof([ProviderSpec("a", [args]), ProviderSpec("b", [args])]).data)
    put("forty-probes", many_probes_dof(40).data)
    for i in range(10):
        providers, version = random_model(rng)
        built = build_dof(providers, version=version)
        put(f"model-{i:02d}", built.data)
        for j in range(2):
            data = bytearray(built.data)
            targeted(rng, built, data)
            put(f"model-{i:02d}-mutant-{j}", bytes(data))
    return written
