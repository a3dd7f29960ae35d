"""Test-side ELF+notes builder: :mod:`common.notes_build` plus corruption helpers and a reader.

``common.notes_build`` writes a minimal valid ELF64 object (ELF header,
``.note.usdt``, ``.rodata``, ``.shstrtab``, section headers: null, notes,
rodata, shstrtab); the helpers here patch single fields of it so that each
test breaks exactly one rule.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from common.dof_build import build_helper
from common.limits import ParseLimits
from common.notes_build import (
    EHDR,
    ET_DYN,
    ET_EXEC,
    SHDR,
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
from common.records import ResultRecord
from parserd.elf_notes import parse_notes

__all__ = [
    "BASE",
    "ET_DYN",
    "ET_EXEC",
    "BuiltObject",
    "CountingReader",
    "NoteProbe",
    "NoteProvider",
    "NoteSite",
    "build_notes",
    "build_object",
    "helper",
    "note",
    "parse",
    "prov_desc",
    "set_ehdr",
    "set_shdr",
    "usdt_desc",
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


def parse(
    data: bytes | BuiltObject,
    *,
    dh: bytes | None = None,
    limits: ParseLimits | None = None,
    size: int | None = None,
) -> list[ResultRecord]:
    raw = data.data if isinstance(data, BuiltObject) else data
    reader = CountingReader(raw)
    out = parse_notes(helper() if dh is None else dh, len(raw) if size is None else size, reader,
                      limits)  # fmt: skip
    limits = limits or ParseLimits()
    assert len(reader.calls) <= limits.max_object_reads
    assert reader.total <= limits.max_object_bytes
    return out


def u32(value: int) -> bytes:
    return struct.pack("<I", value)
