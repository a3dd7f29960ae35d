"""The committed ELF-notes seed corpus (``tests/fuzz/corpus_notes/``).

Regenerate with ``python -m tests.fuzz --make-notes-corpus``.  Small objects
of every shape the model makes (ET_DYN and ET_EXEC, several providers,
translated arguments, is-enabled sites, a probe in several functions and
twice in one), a big provider that reaches upstream's probe-lookup quirk, an
object with a larger ``.rodata`` (the window mode needs more than 1 MiB, too big for a
seed; the unit tests cover it), and targeted mutants of each
that fail different rules.  The real dtrace 2.0.7 objects in
``tests/parser/fixtures/notes/`` are added by the loader, not copied.
"""

from __future__ import annotations

import random
from pathlib import Path

from common.notes_build import ET_EXEC, NoteProbe, NoteProvider, NoteSite, build_object
from tests.fuzz.notes_generator import note_list, random_object, targeted

NOTES_CORPUS_SEED = 20261201


def make_notes_corpus(directory: Path) -> list[Path]:
    rng = random.Random(NOTES_CORPUS_SEED)
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name: str, data: bytes) -> None:
        path = directory / f"{name}.elf"
        path.write_bytes(data)
        written.append(path)

    prov = NoteProvider("one", [NoteProbe("go", ["int", "char *"], [("long", 1)]), NoteProbe("x")])
    sites = [NoteSite("one", "go", "main", 0x1010, sargs="-4@%edi 8@%rsi"),
             NoteSite("one", "go", "main", 0x1008, enabled=True, sargc=1, sargs="8@%rax"),
             NoteSite("one", "x", "helper", 0x1100)]  # fmt: skip
    put("one-provider", build_object([prov], sites).data)
    put("exec", build_object([prov], sites, e_type=ET_EXEC).data)
    names = [f"p{i}" for i in range(24)]
    big = NoteProvider("big", [NoteProbe(n) for n in names])
    big_sites = [NoteSite("big", n, "main", 0x100 + 8 * i) for i, n in enumerate(names)]
    big_sites += [NoteSite("big", n, "main", 0x800 + 8 * i, enabled=True, sargc=1)
                  for i, n in enumerate(names)]  # fmt: skip
    put("big-provider", build_object([big], big_sites).data)
    put("rodata-8k", build_object([prov], sites, rodata_size=8192).data)
    for i in range(10):
        providers, model_sites, e_type = random_object(rng)
        obj = build_object(providers, model_sites, e_type=e_type)
        put(f"model-{i:02d}", obj.data)
        for j in range(2):
            data = bytearray(obj.data)
            targeted(rng, obj, data)
            put(f"model-{i:02d}-mutant-{j}", bytes(data))
        mutant, _how = note_list(rng, providers, model_sites, e_type)
        put(f"model-{i:02d}-notes", mutant.data)
    return written
