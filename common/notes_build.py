"""Build small ELF64 objects with a ``.note.usdt`` section, as ``dtrace -G`` (≥ 2.0.3) lays them out.

Pure (no I/O): the parser child uses it to warm up its notes path before it
locks itself, and the tests and the fuzz corpus build their objects with it.

Note layout (confirmed from dtrace 2.0.7's own objects: ``tests/parser/fixtures/notes/README.md``):
each note is ``u32 namesz, u32 descsz, u32 type``, the name with its NUL padded
to 4, the descriptor padded to 4.  ``prov`` (type 1): provider name NUL-padded
to 4, five u32 attributes, u32 probe count, then per probe (4-aligned) its
name, ``u8 nargc`` and the native types, ``u8 xargc`` and (type, ``u8`` map)
pairs.  ``usdt`` (type 1 probe, 2 is-enabled): ``u64`` site offset, ``u64``
address of the function name in ``.rodata``, provider name, probe name, ``u8``
source-argument count, the source-argument string.

The object: ELF header, ``.note.usdt``, ``.rodata``, ``.shstrtab``, then the
section header table (null section first); nothing is loadable, which the
parser does not need.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.elf_abi import (
    EHDR,
    EM_X86_64,
    ET_DYN,
    NHDR,
    NOTE_ENABLED,
    NOTE_PROBE,
    NOTE_PROV,
    SHDR,
    SHT_NOTE,
    SHT_PROGBITS,
    SHT_STRTAB,
)


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def note(name: bytes, ntype: int, desc: bytes, namesz: int | None = None) -> bytes:
    """One ELF note; *namesz* overrides the header's name size (the name is still padded)."""
    raw_name = name + b"\0"
    size = len(raw_name) if namesz is None else namesz
    return NHDR.pack(size, len(desc), ntype) + _pad4(raw_name) + _pad4(desc)


@dataclass
class NoteProbe:
    """A probe of a ``prov`` note: its D name and argument types."""

    name: str
    native: list[str] = field(default_factory=list)
    xlat: list[tuple[str, int]] = field(default_factory=list)  # (type, native index)


@dataclass
class NoteProvider:
    name: str
    probes: list[NoteProbe]
    attrs: tuple[int, int, int, int, int] = (0x01010101, 0x01010101, 0x01010101, 0x01010101, 0)


@dataclass
class NoteSite:
    """A ``usdt`` note: one probe site.  ``prb`` is the C name (``__`` stands for ``-``)."""

    prv: str
    prb: str
    fun: str
    off: int
    enabled: bool = False
    sargc: int | None = None  # default: the number of arguments in *sargs*
    sargs: str = ""


def prov_desc(prov: NoteProvider) -> bytes:
    out = bytearray(_pad4(prov.name.encode() + b"\0"))
    out += struct.pack("<6I", *prov.attrs, len(prov.probes))
    for probe in prov.probes:
        out += bytes(-len(out) % 4)
        out += probe.name.encode() + b"\0"
        out.append(len(probe.native))
        for t in probe.native:
            out += t.encode() + b"\0"
        out.append(len(probe.xlat))
        for t, m in probe.xlat:
            out += t.encode() + b"\0"
            out.append(m)
    return bytes(out)


def usdt_desc(site: NoteSite, fno: int) -> bytes:
    sargc = site.sargc if site.sargc is not None else len(site.sargs.split())
    return (
        struct.pack("<QQ", site.off, fno)
        + site.prv.encode()
        + b"\0"
        + site.prb.encode()
        + b"\0"
        + bytes([sargc])
        + site.sargs.encode()
        + b"\0"
    )


@dataclass
class BuiltObject:
    """An object and where its parts are (for tests that corrupt them)."""

    data: bytes
    notes_offset: int
    notes_size: int
    rodata_offset: int
    rodata_addr: int
    rodata_size: int
    shstrtab_offset: int
    shoff: int
    shnum: int
    function_addrs: dict[str, int]


def build_notes(
    providers: Sequence[NoteProvider],
    sites: Sequence[NoteSite],
    function_addrs: dict[str, int],
    *,
    extra: Sequence[bytes] = (),
    version_notes: bool = True,
) -> bytes:
    """The ``.note.usdt`` contents: version notes, ``prov`` notes, ``usdt`` notes, *extra*."""
    out = bytearray()
    if version_notes:
        out += note(b"dver", 1, b"2.0.7\0")
        out += note(b"utsn", 1, b"Linux 6.1.0\0")
    for prov in providers:
        out += note(b"prov", NOTE_PROV, prov_desc(prov))
    for site in sites:
        ntype = NOTE_ENABLED if site.enabled else NOTE_PROBE
        out += note(b"usdt", ntype, usdt_desc(site, function_addrs[site.fun]))
    for raw in extra:
        out += raw
    return bytes(out)


def build_object(
    providers: Sequence[NoteProvider],
    sites: Sequence[NoteSite],
    *,
    e_type: int = ET_DYN,
    rodata_addr: int = 0x2000,
    rodata_prefix: bytes = b"\0rodata-prefix\0",
    rodata_size: int | None = None,
    notes: bytes | None = None,
    extra_notes: Sequence[bytes] = (),
    version_notes: bool = True,
) -> BuiltObject:
    """A minimal valid ELF64 x86_64 object holding these providers and sites.

    ``.rodata`` is *rodata_prefix* then every function name once; it is
    zero-padded to *rodata_size* when given.  *notes* replaces the generated
    ``.note.usdt`` contents.
    """
    rodata = bytearray(rodata_prefix)
    function_addrs: dict[str, int] = {}
    for site in sites:
        if site.fun not in function_addrs:
            function_addrs[site.fun] = rodata_addr + len(rodata)
            rodata += site.fun.encode() + b"\0"
    if rodata_size is not None:
        rodata += bytes(max(0, rodata_size - len(rodata)))
    if notes is None:
        notes = build_notes(
            providers, sites, function_addrs, extra=extra_notes, version_notes=version_notes
        )
    shstrtab = b"\0.note.usdt\0.rodata\0.shstrtab\0"
    names = {".note.usdt": 1, ".rodata": 12, ".shstrtab": 20}

    out = bytearray(EHDR.size)
    notes_offset = len(out)
    out += notes
    out += bytes(-len(out) % 16)
    rodata_offset = len(out)
    out += rodata
    shstrtab_offset = len(out)
    out += shstrtab
    out += bytes(-len(out) % 8)
    shoff = len(out)
    shdrs = [
        SHDR.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        SHDR.pack(names[".note.usdt"], SHT_NOTE, 0, 0, notes_offset, len(notes), 0, 0, 4, 0),
        SHDR.pack(
            names[".rodata"], SHT_PROGBITS, 2, rodata_addr, rodata_offset, len(rodata), 0, 0, 16, 0
        ),
        SHDR.pack(names[".shstrtab"], SHT_STRTAB, 0, 0, shstrtab_offset, len(shstrtab), 0, 0, 1, 0),
    ]
    for raw in shdrs:
        out += raw
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    EHDR.pack_into(
        out, 0, ident, e_type, EM_X86_64, 1, 0, 0, shoff, 0, EHDR.size, 0, 0, SHDR.size,
        len(shdrs), 3,
    )  # fmt: skip
    return BuiltObject(
        data=bytes(out),
        notes_offset=notes_offset,
        notes_size=len(notes),
        rodata_offset=rodata_offset,
        rodata_addr=rodata_addr,
        rodata_size=len(rodata),
        shstrtab_offset=shstrtab_offset,
        shoff=shoff,
        shnum=len(shdrs),
        function_addrs=function_addrs,
    )


def warm_up_objects() -> list[bytes]:
    """Objects that reach the notes parser's accept path (every record kind) and reject paths."""
    prov = NoteProvider(
        "warm",
        [NoteProbe("p", ["int", "char *"], [("long", 1)]), NoteProbe("q-r")],
    )
    sites = [
        NoteSite("warm", "p", "main", 0x1010, sargs="-4@%edi -8@%rsi"),
        NoteSite("warm", "p", "main", 0x1020, enabled=True, sargc=1, sargs="8@%rax"),
        NoteSite("warm", "q__r", "f", 0x1030),
    ]
    valid = build_object([prov], sites).data
    bad_magic = b"\0" + valid[1:]
    unknown = build_object([prov], sites, extra_notes=[note(b"what", 1, b"x")]).data
    no_provider = build_object([], sites[:1]).data
    return [valid, bad_magic, unknown, no_provider, valid[:40]]
