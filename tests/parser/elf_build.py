"""Test-side ELF+notes builder: :mod:`common.notes_build` plus corruption helpers and a reader.

``common.notes_build`` writes a minimal valid ELF64 object (ELF header,
``.note.usdt``, ``.rodata``, ``.shstrtab``, section headers: null, notes,
rodata, shstrtab); the helpers here patch single fields of it so that each
test breaks exactly one rule.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from common.dof_build import build_helper
from common.elf_abi import EHDR, ET_DYN, ET_EXEC, SHDR
from common.limits import ParseLimits
from common.notes_build import (
    BuiltObject,
    NoteProbe,
    NoteProvider,
    NoteSite,
    build_notes,
    build_object,
    note,
    prov_desc,
    usdt_desc,
)
from common.records import NotesLocation, ResultRecord
from parserd.elf_notes import locate_notes, parse_note_blocks

__all__ = [
    "BASE",
    "ET_DYN",
    "ET_EXEC",
    "Blocks",
    "BuiltObject",
    "CountingReader",
    "NoteProbe",
    "NoteProvider",
    "NoteSite",
    "blocks_of",
    "build_notes",
    "build_object",
    "cut",
    "helper",
    "locate",
    "note",
    "parse",
    "parse_blocks",
    "prov_desc",
    "set_ehdr",
    "set_shdr",
    "usdt_desc",
    "with_base",
]

BASE = 0x7F1234560000
MODULE = b"libprobes.so.1"

_EHDR_FIELDS = {
    name: i
    for i, name in enumerate(
        [
            "ident",
            "type",
            "machine",
            "version",
            "entry",
            "phoff",
            "shoff",
            "flags",
            "ehsize",
            "phentsize",
            "phnum",
            "shentsize",
            "shnum",
            "shstrndx",
        ]
    )
}
_SHDR_FIELDS = {
    name: i
    for i, name in enumerate(
        ["name", "type", "flags", "addr", "offset", "size", "link", "info", "addralign", "entsize"]
    )
}


def helper(mod: bytes = MODULE, addr: int = BASE) -> bytes:
    return build_helper(mod, addr, 0)


def set_ehdr(data: bytes, **fields: int | bytes) -> bytes:
    """*data* with ELF header fields replaced (``ident`` is the 16-byte e_ident)."""
    values = list(EHDR.unpack_from(data))
    for name, value in fields.items():
        values[_EHDR_FIELDS[name]] = value
    out = bytearray(data)
    EHDR.pack_into(out, 0, *values)
    return bytes(out)


def set_shdr(obj: BuiltObject, index: int, data: bytes | None = None, **fields: int) -> bytes:
    """*data* (default the object's) with fields of section header *index* replaced."""
    out = bytearray(obj.data if data is None else data)
    at = obj.shoff + index * SHDR.size
    values = list(SHDR.unpack_from(out, at))
    for name, value in fields.items():
        values[_SHDR_FIELDS[name]] = value
    SHDR.pack_into(out, at, *values)
    return bytes(out)


def patch(data: bytes, offset: int, raw: bytes) -> bytes:
    return data[:offset] + raw + data[offset + len(raw) :]


@dataclass
class CountingReader:
    """A ``read(offset, size)`` over bytes that records every call."""

    data: bytes
    calls: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, offset: int, size: int) -> bytes:
        assert size >= 1 and offset >= 0, (offset, size)
        self.calls.append((offset, size))
        return self.data[offset : offset + size]

    @property
    def total(self) -> int:
        return sum(size for _, size in self.calls)


class Blocks(NamedTuple):
    """The two blocks of a ``ParseNoteBlocks``: whole ``.note.usdt`` and whole ``.rodata``."""

    notes: bytes
    rodata: bytes
    rodata_addr: int
    notes_addr: int = 0


def blocks_of(obj: BuiltObject) -> Blocks:
    """The blocks of a built object, as the host cuts them from the file."""
    data = obj.data
    return Blocks(
        data[obj.notes_offset : obj.notes_offset + obj.notes_size],
        data[obj.rodata_offset : obj.rodata_offset + obj.rodata_size],
        obj.rodata_addr,
    )


def cut(data: bytes, loc: NotesLocation) -> Blocks:
    """The blocks *loc* names, cut from the file's bytes (what the host reads)."""
    return Blocks(
        data[loc.notes_offset : loc.notes_offset + loc.notes_size],
        data[loc.rodata_offset : loc.rodata_offset + loc.rodata_size],
        loc.rodata_addr,
        loc.notes_addr,
    )


def locate(
    data: bytes | BuiltObject,
    *,
    dh: bytes | None = None,
    limits: ParseLimits | None = None,
    size: int | None = None,
    reader: CountingReader | None = None,
) -> list[ResultRecord]:
    """``LocateNotes`` on the object's bytes, checking the read budgets were kept."""
    raw = data.data if isinstance(data, BuiltObject) else data
    reader = reader if reader is not None else CountingReader(raw)
    out = locate_notes(helper() if dh is None else dh, len(raw) if size is None else size, reader,
                       limits)  # fmt: skip
    limits = limits or ParseLimits()
    assert len(reader.calls) <= limits.max_object_reads
    assert reader.total <= limits.max_object_bytes
    assert len(out) == 1, out
    return out


def with_base(dh: bytes, base: int) -> bytes:
    """*dh* with ``dofhp_addr`` = *base* (what the host stores and sends after LocateNotes)."""
    return dh[:64] + base.to_bytes(8, "little") + dh[72:]


def parse_blocks(
    blocks: Blocks, *, dh: bytes | None = None, limits: ParseLimits | None = None
) -> list[ResultRecord]:
    """``ParseNoteBlocks`` (*dh*'s ``dofhp_addr`` is the base)."""
    return parse_note_blocks(
        helper() if dh is None else dh,
        blocks.notes_addr,
        blocks.notes,
        blocks.rodata_addr,
        blocks.rodata,
        limits,
    )


def parse(
    data: bytes | BuiltObject | Blocks,
    *,
    dh: bytes | None = None,
    limits: ParseLimits | None = None,
    size: int | None = None,
) -> list[ResultRecord]:
    """Both phases, as the host runs them: locate, cut the blocks from the file, parse them.

    The answer is the ``LocateNotes`` ``Err`` if the object was refused there, else the
    ``ParseNoteBlocks`` stream.  *data* given as :class:`Blocks` skips the ELF phase.
    """
    dh = helper() if dh is None else dh
    if isinstance(data, Blocks):
        return parse_blocks(data, dh=dh, limits=limits)
    raw = data.data if isinstance(data, BuiltObject) else data
    located = locate(raw, dh=dh, limits=limits, size=size)[0]
    if not isinstance(located, NotesLocation):
        return [located]
    return parse_blocks(cut(raw, located), dh=with_base(dh, located.base), limits=limits)


def u32(value: int) -> bytes:
    return struct.pack("<I", value)
