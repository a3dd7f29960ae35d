"""The committed ELF-notes seed corpus (``tests/fuzz/corpus_notes/``).

Regenerate with ``python -m tests.fuzz --make-notes-corpus``.  Small objects
of every shape the model makes (ET_DYN and ET_EXEC, several providers,
translated arguments, is-enabled sites, a probe in several functions and
twice in one), a big provider that reaches upstream's probe-lookup quirk, an
object with a larger ``.rodata``, and targeted mutants of each that fail
different rules (``*.elf``: both exchanges, LocateNotes then ParseNoteBlocks).
Then ``*.blocks`` seeds: ParseNoteBlocks requests that no ELF file stands in
front of (msgpack ``[helper, notes_addr, notes, rodata_addr, rodata]``): a
valid pair, the notes against a ``.rodata`` at another address, an empty or
cut ``.rodata``, notes that are not 4-byte multiples, the base near 2^64.
The real dtrace 2.0.7 objects in ``tests/parser/fixtures/notes/`` are added by
the loader, not copied.
"""

from __future__ import annotations

import random
from pathlib import Path

import msgspec

from common.dof_build import build_helper
from common.elf_abi import ET_EXEC
from common.notes_build import NoteProbe, NoteProvider, NoteSite, build_object
from tests.fuzz.notes_generator import mutate_blocks, note_list, random_object, targeted
from tests.fuzz.notes_harness import BlocksSeed

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

    def put_blocks(name: str, seed: BlocksSeed) -> None:
        path = directory / f"{name}.blocks"
        path.write_bytes(msgspec.msgpack.encode(seed))
        written.append(path)

    obj = build_object([prov], sites)
    notes = obj.data[obj.notes_offset : obj.notes_offset + obj.notes_size]
    rodata = obj.data[obj.rodata_offset : obj.rodata_offset + obj.rodata_size]
    dh = build_helper(b"blocks.so", 0x7F0000000000)
    put_blocks("blocks-valid", BlocksSeed(dh, 0x300, notes, obj.rodata_addr, rodata))
    put_blocks("blocks-moved-rodata", BlocksSeed(dh, 0, notes, obj.rodata_addr + 8, rodata))
    put_blocks("blocks-empty-rodata", BlocksSeed(dh, 0, notes, obj.rodata_addr, b""))
    put_blocks("blocks-cut-rodata", BlocksSeed(dh, 0, notes, obj.rodata_addr, rodata[:-3]))
    put_blocks("blocks-odd-notes", BlocksSeed(dh, 0, notes + b"\0\0", obj.rodata_addr, rodata))
    put_blocks("blocks-empty", BlocksSeed(dh, 0, b"", 0, b""))
    top = build_helper(b"blocks.so", (1 << 64) - 0x1000)
    put_blocks("blocks-base-overflow", BlocksSeed(top, 0, notes, obj.rodata_addr, rodata))
    brng = random.Random(NOTES_CORPUS_SEED + 1)
    for i in range(6):
        n, r, addr, _how = mutate_blocks(brng, notes, rodata, obj.rodata_addr, obj.data)
        put_blocks(f"blocks-mutant-{i}", BlocksSeed(dh, 0, n, addr, r))
    return written
