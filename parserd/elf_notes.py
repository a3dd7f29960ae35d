"""The ELF-notes parser, in two phases: locate the blocks in the object, then parse the blocks.

Since dtrace 2.0.3, ``dtrace -G`` describes providers and probes in ELF notes
(confirmed from real objects: ``tests/parser/fixtures/notes/README.md``).  Upstream's
daemon finds the sections with libelf in the *privileged* process (where its
2026 CVEs are: CVE-2026-21996, a divide-by-zero on corrupted section headers;
CVE-2026-35233, an out-of-bounds read building a symbol table).  Here every
byte of the object is interpreted in the sandbox, and never raises for any
input:

* :func:`locate_notes` (request ``LocateNotes``) gets a ``read(offset, size)
  -> bytes`` callable (in the child, the ``ReadAt`` / ``ObjectBytes`` exchange
  over its pipes) and the file size; it reads the ELF header, the section
  header table and the section-name table, and answers ``[NotesLocation]``
  (the load base and where ``.note.usdt`` and ``.rodata`` lie) or ``[Err]``.
  It never reads either section's contents.
* :func:`parse_note_blocks` (request ``ParseNoteBlocks``) gets the two blocks
  the host read at that location (or, at a reparse, took from the stash, as
  upstream stores them) and answers ``[PROVIDER …, EOF]`` or ``[Err]``.

The host reads the blocks once and stores exactly the bytes that were parsed:
a process cannot rewrite its file between the parse and the stash.

Structure handling (ours; upstream leaves it to libelf)
-------------------------------------------------------
ELFCLASS64, little-endian, ``EV_CURRENT``, x86_64, ET_EXEC or ET_DYN only.
``e_shentsize`` must be 64 (we never divide by it); the section header table,
every section used and every name are bounds-checked with exact integers
(Python ints do not wrap); extended section numbering (``e_shnum`` 0,
``e_shstrndx`` ``SHN_XINDEX``) is followed; ``sh_name`` must lie inside the
section-name table and end in a NUL inside it.  ``.note.usdt`` (SHT_NOTE) and
``.rodata`` (SHT_PROGBITS) must lie inside the file, the notes at a 4-aligned
offset, and together hold at most ``max_object_bytes`` (E2BIG).  No symbol
table is built: the function names come from the ``.rodata`` block at the
addresses the notes give (``addr - rodata_addr``), each looked for within its
128 bytes (``DTRACE_FUNCNAMELEN``) and inside the block.  Every read is
bounded by the file size, by :data:`~common.limits.MAX_OBJECT_READ` per read
(longer ranges are split), and by the request's budgets ``max_object_reads``
/ ``max_object_bytes`` (E2BIG when the headers would need more);
``ParseNoteBlocks`` refuses blocks of more than ``max_object_bytes`` together
(E2BIG).

Rules and messages (upstream's ``libcommon/usdt_parser_notes.c``, in its order)
-------------------------------------------------------------------------------
Daemon side (upstream ``handle_usdt_notes``): ``no .note.usdt section in MOD``,
``no .rodata section in MOD`` (upstream names the file; the parser knows only
``dofhp_mod``).  Note walk, per note: ``Invalid ELF note offset N``,
``Invalid name size N``, ``Invalid desc size N`` (``%d`` of a u32: values
≥ 2^31 print negative, as upstream), name ``prov`` / ``usdt`` / ``dver`` /
``utsn`` (ignored) / other: ``Unknown note: NAME``.  ``prov``: provider name,
``Incomplete note data``, ``Duplicate provider: P`` (EEXIST); per probe:
``Incomplete note data``, ``Duplicate probe: P:MOD::PRB`` (EEXIST), native
and translated types (``Incomplete note data``).  ``usdt`` (type 2 is
is-enabled, any other type a regular probe, as upstream): ``Incomplete note
data``, ``Invalid function name offset``, probe name with ``__`` → ``-``,
``Duplicate probe: P:MOD:FUN:PRB`` (EEXIST), source-argument count and string.
Then each tracepoint: ``No such provider: P`` (ENOENT), ``No such probe:
P:::PRB`` (ENOENT), ``P:::PRB[ (is-enabled)] prototype mismatch: N passed, M
expected`` (``%hhd``: counts ≥ 128 print negative, as upstream).  A tracepoint's
address is ``off + base``; its function is the ``.rodata`` string; its module
is ``dofhp_mod``; a probe inherits the argument types of the ``prov`` probe of
that name; probes without tracepoints and providers without probes are not
emitted.

Ours (EINVAL unless a limit, E2BIG): the name policy on every provider,
module, function, probe name and argument type (after upstream's checks of
that note), on the ``prv:mod:fun:prb`` length, and the control-character and
length policy on the source-argument string; a translated type's map entry
must be below ``nargc`` (``bad native argument index for arg K: M (max N)``,
the DOF parser's message); strings must end inside their note (upstream's
``strlen`` may run past it: for the ``xargc`` byte and the last map byte it
reads outside the note); the note section's file offset must be 4-aligned
(``Pointer to note header not aligned``); tracepoint offsets must fit 32 bits
(upstream keeps them in a ``uint32_t`` and silently truncates) and ``base +
off`` must not pass 2^64; ``max_providers``, ``max_probes`` (probes defined in
``prov`` notes, and probes emitted), ``max_tracepoints`` (``usdt`` notes) and
at most 131070 tracepoints in one probe; at most ``max_tracepoints +
max_providers + 4096`` notes in all (``note count N exceeds maximum M``), so
that megabytes of tiny ignored notes cannot keep the parser busy for seconds.

Emission order (the finding)
----------------------------
Upstream emits in the iteration order of its ``dt_htab`` hash tables, not in
file order: providers in ``prvmap`` order (key ``str2hval(name, 0)``), each
provider's probes in its ``pmap`` order, and it validates tracepoints in
``prbmap`` order (so *which* error a bad object reports depends on it).  A
``dt_htab`` starts with one slot, doubles when ``nbuckets / 2 > size`` at a
new bucket's insertion, prepends new buckets to their slot, and its resize
walks the old slots in order, prepending, so bucket order within a slot
reverses.  The order is deterministic, so :class:`_Htab` reproduces it
exactly (with ``str2hval``'s signed ``char``), and we emit providers and
probes, and report the first failing tracepoint, in upstream's order.

The consumer does not depend on that order: every probe is its own stash file
(``parsed/prv:mod:fun:prb``), found by ``glob``, and ``dt_pid.c`` handles each
TRACEPOINT of a probe file independently (one ``provide_probe`` per record,
no state carried between them).  Still, so that our parsed files are
byte-identical to upstream's, tracepoints within a probe are emitted in
upstream's order too: upstream keeps them in a list whose head is the first
tracepoint validated, each later one inserted right after the head, so it
writes the first validated, then the others in reverse validation order.
The notes grammar (``StreamChecker(notes=True)``) therefore asks only for
unique addresses within a probe, not DOF's ascending order.  Checked against
upstream's real daemon (``tests/golden/upstream-2.0.7``, 15 registrations of
the dtrace 2.0.7 fixtures): every one of upstream's 48 probe files is
byte-identical to ours (``test_notes_upstream_goldens.py``).

Upstream bug we do not copy: the lookup of an already-created
function-specific probe hashes its key with offset 0, while the probe was
inserted with its first tracepoint's offset as hash seed.  The low four bits of
a ``str2hval`` are the last character's, so the two keys land in one slot
while the provider's table has at most 16 slots; once it has 32 or more (more
than 64 entries: defined probes plus function-specific ones), a probe whose
tracepoints are in one function (a probe fired twice, or an is-enabled test
and its probe, the common pattern) is often *not* found and is emitted again
as a second PROBE record with the same ``prv:mod:fun:prb`` (measured with
this model: 2 of 40 such probes, 15 of 64) — which our grammar forbids.  We merge such
tracepoints into the probe created first (at its position in upstream's order)
and count it once in ``nprobes``.

Other differences, on input upstream mishandles: a note name without a NUL
inside ``namesz`` is an unknown note (upstream's ``strcmp`` reads on into the
descriptor); a tracepoint with offset 0 and another of the same probe are
reported as duplicates exactly when upstream's table puts them in one slot
(its comparison ignores a zero offset), as upstream.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from errno import E2BIG, EEXIST, EINVAL, ENOENT
from typing import Final, NamedTuple

from common.dof_abi import DOF_HELPER, DTRACE_FUNCNAMELEN, DTRACE_MODNAMELEN
from common.elf_abi import (
    EHDR,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFMAG,
    EM_X86_64,
    ET_DYN,
    ET_EXEC,
    EV_CURRENT,
    NHDR,
    NOTE_ENABLED,
    NOTES_SECTION,
    RODATA_SECTION,
    SHDR,
    SHN_LORESERVE,
    SHN_UNDEF,
    SHN_XINDEX,
    SHT_NOTE,
    SHT_PROGBITS,
    SHT_STRTAB,
)
from common.limits import MAX_OBJECT_READ, ParseLimits
from common.names import NameRefused, check_probespec, decode_name, printable
from common.records import (
    MAX_NTP,
    ArgsMap,
    ArgsNative,
    ArgsXlat,
    Eof,
    Err,
    NotesLocation,
    Probe,
    Provider,
    ResultRecord,
    Tracepoint,
)
from parserd.rejection import ELLIPSIS, Rejected, clamp, reject

ReadFn = Callable[[int, int], bytes]
#: dtrace -G <= 2.0.2's section of DOF (allocated: drti read it in memory).
DOF_SECTION: Final = ".SUNW_dof"
SHF_ALLOC: Final = 0x2

_U32: Final = struct.Struct("<I")
_U64X2: Final = struct.Struct("<QQ")
_U64_MAX: Final = (1 << 64) - 1
#: Notes allowed beyond one per tracepoint and provider: ``dver``/``utsn`` (one pair per
#: ``dtrace -G`` run linked into the object).  Bounds the walk's CPU time: without it 60 MiB
#: of tiny ignored notes take seconds of Python.
EXTRA_NOTES: Final = 4096


def _s32(value: int) -> int:
    """C ``%d`` of a 32-bit value."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _s8(value: int) -> int:
    """C ``%hhd`` of a byte."""
    return value - 256 if value & 0x80 else value


def _show(raw: bytes) -> str:
    """Name bytes in a message: escaped and bounded (upstream prints them raw)."""
    if len(raw) > 256:
        return printable(raw[:256]) + ELLIPSIS
    return printable(raw)


def str2hval(data: bytes, hval: int) -> int:
    """Upstream's ``str2hval`` (ELF-style hash), with x86_64's signed ``char``."""
    for byte in data:
        hval = ((hval << 4) + (byte - 256 if byte & 0x80 else byte)) & 0xFFFFFFFF
        g = hval & 0xF0000000
        if g:
            hval ^= g >> 24
        hval &= ~g & 0xFFFFFFFF
    return hval


class _Htab:
    """Just enough of upstream's ``dt_htab`` to reproduce its lookups and iteration order.

    Each slot is a list of buckets, newest first; a bucket here holds one entry
    (upstream only inserts after a failed lookup, so no bucket ever gets a second).
    """

    def __init__(self) -> None:
        self.size = 1
        self.nbuckets = 0
        self.slots: list[list[tuple[int, object]]] = [[]]

    def lookup(self, hval: int, same: Callable[[object], bool]) -> object | None:
        for _hval, entry in self.slots[hval & (self.size - 1)]:
            if same(entry):
                return entry
        return None

    def insert(self, hval: int, entry: object) -> None:
        if (self.nbuckets >> 1) > self.size:
            size = self.size << 1
            slots: list[list[tuple[int, object]]] = [[] for _ in range(size)]
            for slot in self.slots:
                for bucket in slot:
                    slots[bucket[0] & (size - 1)].insert(0, bucket)
            self.slots, self.size = slots, size
        self.slots[hval & (self.size - 1)].insert(0, (hval, entry))
        self.nbuckets += 1

    def __iter__(self) -> Iterator[object]:
        for slot in self.slots:
            for _hval, entry in slot:
                yield entry


class _Section(NamedTuple):
    num: int
    name: int
    type: int
    addr: int
    offset: int
    size: int
    link: int
    flags: int = 0


class _Defined:
    """A probe of a ``prov`` note (upstream: a ``dt_probe_t`` with a NULL function)."""

    __slots__ = ("args", "name", "nargc", "xargc")

    def __init__(self, name: bytes, nargc: int, xargc: int) -> None:
        self.name = name
        self.nargc = nargc
        self.xargc = xargc
        self.args: tuple[ResultRecord, ...] = ()


class _Provider:
    __slots__ = ("defined", "name", "pmap", "probes", "text")

    def __init__(self, name: bytes, text: str) -> None:
        self.name = name
        self.text = text
        self.pmap = _Htab()
        self.defined: dict[bytes, _Defined] = {}
        self.probes: dict[tuple[bytes, bytes], _Probe] = {}


class _Site:
    """One ``usdt`` note (upstream: a tracepoint ``dt_probe_t`` in ``prbmap``)."""

    __slots__ = ("enabled", "fun", "off", "prb", "prv", "sargc", "sargs", "text")

    def __init__(
        self, prv: bytes, fun: bytes, prb: bytes, off: int, enabled: bool, sargc: int, sargs: str
    ) -> None:
        self.prv = prv
        self.fun = fun
        self.prb = prb
        self.off = off
        self.enabled = enabled
        self.sargc = sargc
        self.sargs = sargs
        self.text: tuple[str, str, str] = ("", "", "")  # prv, fun, prb once the policy passed


class _Probe:
    """A function-specific probe being emitted: its records and tracepoints."""

    __slots__ = ("defined", "fun", "prb", "sites")

    def __init__(self, fun: bytes, prb: bytes, defined: _Defined) -> None:
        self.fun = fun
        self.prb = prb
        self.defined = defined
        self.sites: list[_Site] = []


class _Reader:
    """Budgeted reads of the object: every range inside the file, every byte counted."""

    def __init__(self, read: ReadFn, file_size: int, limits: ParseLimits) -> None:
        self._read = read
        self.file_size = file_size
        self.limits = limits
        self.reads = 0
        self.bytes = 0

    def get(self, offset: int, size: int, what: str) -> bytes:
        if size <= 0:
            return b""
        if offset < 0 or offset + size > self.file_size:
            reject(
                f"{what} (offset {offset:#x}, size {size:#x}) extends past the end of the "
                f"file ({self.file_size} bytes)"
            )
        nreads = -(-size // MAX_OBJECT_READ)
        if self.reads + nreads > self.limits.max_object_reads:
            reject(
                f"reading {what} needs more than {self.limits.max_object_reads} object reads "
                f"(max_object_reads)",
                E2BIG,
            )
        if self.bytes + size > self.limits.max_object_bytes:
            reject(
                f"reading {what} needs {self.bytes + size} bytes of the object, more than "
                f"{self.limits.max_object_bytes} (max_object_bytes)",
                E2BIG,
            )
        parts = []
        done = 0
        while done < size:
            want = min(MAX_OBJECT_READ, size - done)
            self.reads += 1
            self.bytes += want
            got = self._read(offset + done, want)
            if len(got) != want:
                reject(
                    f"short read of {what} at offset {offset + done:#x}: {len(got)} of {want} "
                    f"bytes (the file changed?)"
                )
            parts.append(got)
            done += want
        return parts[0] if len(parts) == 1 else b"".join(parts)


def locate_notes(
    helper: bytes,
    file_size: int,
    read: ReadFn,
    limits: ParseLimits | None = None,
    *,
    dof: bool = False,
) -> list[ResultRecord]:
    """The ELF phase (``LocateNotes``): ``[NotesLocation]`` or ``[Err]``.

    Reads only the ELF header, the section header table and the section-name
    table, through *read(offset, size)*, which must return the file's bytes
    there (exceptions it raises propagate: they are the transport's, not the
    input's).  Nothing in the file's contents makes this raise.

    With *dof* (catch-up of an object nobody registered yet) an allocated
    ``.SUNW_dof`` (SHT_PROGBITS, SHF_ALLOC, 1 byte to ``max_dof_size``) is
    located too, and an object with only that is accepted; its bytes are
    not in the request: the host reads them from the process's memory.
    """
    try:
        parser = _NotesParser(helper, limits or ParseLimits())
        return [parser.locate(_Reader(read, file_size, parser.limits), dof=dof)]
    except Rejected as rejected:
        return [Err(errno=rejected.errno, message=clamp(rejected.message))]


def parse_note_blocks(
    helper: bytes,
    notes_addr: int,
    notes: bytes,
    rodata_addr: int,
    rodata: bytes,
    limits: ParseLimits | None = None,
) -> list[ResultRecord]:
    """The notes phase (``ParseNoteBlocks``): ``[Provider …, Eof]`` or ``[Err]``.

    *notes* is the whole ``.note.usdt``, *rodata* the whole ``.rodata`` whose
    ``sh_addr`` is *rodata_addr*; *helper*'s ``dofhp_addr`` is the load base
    (``NotesLocation.base``).  *notes_addr* is not needed to parse (the notes
    hold no addresses inside themselves); it is part of the request because it
    is part of what the stash stores.  Nothing in the blocks makes this raise.
    """
    del notes_addr
    try:
        return _NotesParser(helper, limits or ParseLimits()).parse_blocks(
            notes, _Rodata(rodata_addr, rodata)
        )
    except Rejected as rejected:
        return [Err(errno=rejected.errno, message=clamp(rejected.message))]
    except RecursionError:  # not reachable: no recursion here; belt and braces for the contract
        return [Err(errno=EINVAL, message="object too complex")]


class _NotesParser:
    def __init__(self, helper: bytes, limits: ParseLimits) -> None:
        self.limits = limits
        self.names: dict[tuple[str, bytes], str] = {}
        self.argtypes: dict[bytes, str] = {}
        self.module_raw, self.module, self.dofhp_addr = self._helper(helper)

    # --- helpers ---------------------------------------------------------------------

    def _name(self, kind: str, raw: bytes) -> str:
        key = (kind, raw)
        value = self.names.get(key)
        if value is None:
            try:
                value = decode_name(kind, raw)
            except NameRefused as err:
                reject(str(err))
            self.names[key] = value
        return value

    def _helper(self, helper: bytes) -> tuple[bytes, str, int]:
        if len(helper) != DOF_HELPER.size:
            reject(f"helper size incorrect: expected {DOF_HELPER.size}, not {len(helper)}")
        mod_field, dofhp_addr, _dof = DOF_HELPER.unpack_from(helper)
        nul = mod_field.find(0)
        if nul < 0:
            reject(
                f"module name (dofhp_mod) is not NUL-terminated within {DTRACE_MODNAMELEN} bytes"
            )
        raw = mod_field[:nul]
        return raw, self._name("module", raw), dofhp_addr

    # --- the two phases --------------------------------------------------------------

    def locate(self, reader: _Reader, *, dof: bool = False) -> NotesLocation:
        self.reader = reader
        self.file_size = reader.file_size
        e_type, sections, shstrtab = self._elf()
        dof_sec = self._sunw_dof(sections, shstrtab) if dof else None
        if dof_sec is not None and not self._has(sections, shstrtab, NOTES_SECTION, SHT_NOTE):
            return NotesLocation(
                base=self.dofhp_addr if e_type == ET_DYN else 0,
                notes_addr=0,
                notes_offset=0,
                notes_size=0,
                rodata_addr=0,
                rodata_offset=0,
                rodata_size=0,
                dof_addr=dof_sec.addr,
                dof_size=dof_sec.size,
                notes_found=False,
            )
        notes_sec = self._find(sections, shstrtab, NOTES_SECTION, SHT_NOTE)
        rodata_sec = self._find(sections, shstrtab, RODATA_SECTION, SHT_PROGBITS)
        self._bounds(notes_sec, NOTES_SECTION)
        self._bounds(rodata_sec, RODATA_SECTION)
        if notes_sec.offset % 4:
            reject("Pointer to note header not aligned")
        total = notes_sec.size + rodata_sec.size
        if total > self.limits.max_object_bytes:
            reject(
                f"sections {NOTES_SECTION} and {RODATA_SECTION} hold {total} bytes "
                f"({notes_sec.size} + {rodata_sec.size}), more than "
                f"{self.limits.max_object_bytes} (max_object_bytes)",
                E2BIG,
            )
        return NotesLocation(
            base=self.dofhp_addr if e_type == ET_DYN else 0,
            notes_addr=notes_sec.addr,
            notes_offset=notes_sec.offset,
            notes_size=notes_sec.size,
            rodata_addr=rodata_sec.addr,
            rodata_offset=rodata_sec.offset,
            rodata_size=rodata_sec.size,
            dof_addr=dof_sec.addr if dof_sec is not None else 0,
            dof_size=dof_sec.size if dof_sec is not None else 0,
        )

    def _has(self, sections: list[_Section], shstrtab: bytes, name: str, kind: int) -> bool:
        return self._lookup(sections, shstrtab, name, kind) is not None

    def _sunw_dof(self, sections: list[_Section], shstrtab: bytes) -> _Section | None:
        """The object's ``.SUNW_dof``, checked; None when it has none."""
        sec = self._lookup(sections, shstrtab, DOF_SECTION, SHT_PROGBITS)
        if sec is None:
            return None
        if not sec.flags & SHF_ALLOC:
            reject(f"{self.module}: section {DOF_SECTION} is not allocated (no SHF_ALLOC)")
        if sec.size == 0:
            reject(f"{self.module}: section {DOF_SECTION} is empty")
        if sec.size > self.limits.max_dof_size:
            reject(
                f"{self.module}: section {DOF_SECTION} of {sec.size} bytes exceeds maximum "
                f"{self.limits.max_dof_size}",
                E2BIG,
            )
        return sec

    def parse_blocks(self, notes: bytes, rodata: _Rodata) -> list[ResultRecord]:
        total = len(notes) + len(rodata.data)
        if total > self.limits.max_object_bytes:
            reject(
                f"blocks {NOTES_SECTION} and {RODATA_SECTION} hold {total} bytes "
                f"({len(notes)} + {len(rodata.data)}), more than "
                f"{self.limits.max_object_bytes} (max_object_bytes)",
                E2BIG,
            )
        return self._notes(notes, rodata, self.dofhp_addr)

    # --- ELF structure ---------------------------------------------------------------

    def _elf(self) -> tuple[int, list[_Section], bytes]:
        mod = self.module
        size = self.file_size
        head = self.reader.get(0, min(size, EHDR.size), "ELF header") if size else b""
        if len(head) < 4 or head[:4] != ELFMAG:
            reject(f"{mod}: not an ELF file")
        if len(head) < 16:
            reject(f"{mod}: truncated ELF header ({size} bytes)")
        if head[4] != ELFCLASS64:
            reject(f"{mod}: unsupported ELF class {head[4]} (only ELFCLASS64)")
        if head[5] != ELFDATA2LSB:
            reject(f"{mod}: unsupported ELF data encoding {head[5]} (only little-endian)")
        if head[6] != EV_CURRENT:
            reject(f"{mod}: unsupported ELF version {head[6]}")
        if len(head) < EHDR.size:
            reject(f"{mod}: truncated ELF header ({size} bytes)")
        (
            _ident, e_type, e_machine, _e_version, _entry, _phoff, e_shoff, _flags,
            _ehsize, _phentsize, _phnum, e_shentsize, e_shnum, e_shstrndx,
        ) = EHDR.unpack(head)  # fmt: skip
        if e_machine != EM_X86_64:
            reject(f"{mod}: unsupported ELF machine {e_machine} (only x86_64)")
        if e_type not in (ET_EXEC, ET_DYN):
            reject(f"{mod}: unsupported ELF type {e_type} (only ET_EXEC and ET_DYN)")
        if e_shoff == 0:
            reject(f"no {NOTES_SECTION} section in {mod}")
        if e_shentsize != SHDR.size:
            reject(f"{mod}: invalid section header size {e_shentsize}, expected {SHDR.size}")
        if e_shoff >= size or size - e_shoff < SHDR.size:
            reject(
                f"{mod}: section header table offset {e_shoff:#x} past the end of the file "
                f"({size} bytes)"
            )
        shnum, shstrndx = e_shnum, e_shstrndx
        if shnum == 0 or shstrndx == SHN_XINDEX:  # extended numbering: in section 0
            first = self._shdrs(e_shoff, 1)[0]
            if shnum == 0:
                shnum = first.size
            if shstrndx == SHN_XINDEX:
                shstrndx = first.link
        elif shstrndx >= SHN_LORESERVE:
            reject(f"{mod}: invalid section name table index {shstrndx:#x}")
        if shnum == 0:
            reject(f"no {NOTES_SECTION} section in {mod}")
        if shnum > (size - e_shoff) // SHDR.size:
            reject(
                f"{mod}: section header table ({shnum} entries at offset {e_shoff:#x}) extends "
                f"past the end of the file ({size} bytes)"
            )
        if shstrndx == SHN_UNDEF:
            reject(f"no {NOTES_SECTION} section in {mod}")  # no names: nothing can match
        if shstrndx >= shnum:
            reject(f"{mod}: section name table index {shstrndx} out of range ({shnum} sections)")
        sections = self._shdrs(e_shoff, shnum)
        strsec = sections[shstrndx]
        if strsec.type != SHT_STRTAB:
            reject(f"{mod}: section name table (section {shstrndx}) is not SHT_STRTAB")
        self._bounds(strsec, "section name table")
        shstrtab = self.reader.get(strsec.offset, strsec.size, "section name table")
        return e_type, sections, shstrtab

    def _shdrs(self, offset: int, count: int) -> list[_Section]:
        raw = self.reader.get(offset, count * SHDR.size, "section header table")
        out = []
        for i, (name, kind, flags, addr, off, sz, link, _info, _align, _entsize) in enumerate(
            SHDR.iter_unpack(raw)
        ):
            out.append(_Section(i, name, kind, addr, off, sz, link, flags))
        return out

    def _bounds(self, sec: _Section, what: str) -> None:
        if sec.offset > self.file_size or sec.size > self.file_size - sec.offset:
            reject(
                f"{self.module}: {what} (section {sec.num}, offset {sec.offset:#x}, size "
                f"{sec.size:#x}) extends past the end of the file ({self.file_size} bytes)"
            )

    def _find(self, sections: list[_Section], shstrtab: bytes, name: str, kind: int) -> _Section:
        sec = self._lookup(sections, shstrtab, name, kind)
        if sec is None:
            reject(f"no {name} section in {self.module}")
        return sec

    def _lookup(
        self, sections: list[_Section], shstrtab: bytes, name: str, kind: int
    ) -> _Section | None:
        want = name.encode()
        for sec in sections:
            if sec.num == 0:
                continue  # SHN_UNDEF's entry is no section (and holds extended counts)
            if sec.name >= len(shstrtab):
                reject(
                    f"{self.module}: section {sec.num}: name offset {sec.name:#x} outside "
                    f"the section name table ({len(shstrtab)} bytes)"
                )
            end = shstrtab.find(0, sec.name)
            if end < 0:
                reject(
                    f"{self.module}: section {sec.num}: name at offset {sec.name:#x} is not "
                    f"NUL-terminated in the section name table"
                )
            if sec.type == kind and shstrtab[sec.name : end] == want:
                return sec
        return None

    # --- the notes -------------------------------------------------------------------

    def _max_notes(self) -> int:
        return self.limits.max_tracepoints + self.limits.max_providers + EXTRA_NOTES

    def _notes(self, data: bytes, rodata: _Rodata, base: int) -> list[ResultRecord]:
        limits = self.limits
        prvmap = _Htab()
        providers: dict[bytes, _Provider] = {}
        prbmap = _Htab()
        mod = self.module_raw
        nsites = 0
        max_notes = self._max_notes()
        ndefined = 0
        for count, (name, ntype, start, stop) in enumerate(_walk(data), 1):
            if count > max_notes:
                reject(
                    f"note count {count} exceeds maximum {max_notes} (max_tracepoints + "
                    f"max_providers + {EXTRA_NOTES})",
                    E2BIG,
                )
            if name == b"dver" or name == b"utsn":
                continue
            desc = data[start:stop]
            if name == b"prov":
                prov = self._prov(desc, providers, prvmap, ndefined)
                ndefined += len(prov.defined)
                if len(providers) > limits.max_providers:
                    reject(
                        f"provider count {len(providers)} exceeds maximum "
                        f"{limits.max_providers} (max_providers)",
                        E2BIG,
                    )
                if ndefined > limits.max_probes:
                    reject(
                        f"probe count {ndefined} exceeds maximum {limits.max_probes} (max_probes)",
                        E2BIG,
                    )
            elif name == b"usdt":
                site = self._usdt(desc, ntype, rodata, prbmap)
                nsites += 1
                if nsites > limits.max_tracepoints:
                    reject(
                        f"tracepoint count {nsites} exceeds maximum {limits.max_tracepoints} "
                        f"(max_tracepoints)",
                        E2BIG,
                    )
                if site.off > 0xFFFFFFFF:
                    reject(f"tracepoint offset {site.off:#x} does not fit 32 bits")
                if base + site.off > _U64_MAX:
                    reject(f"tracepoint address overflow: {base:x} + {site.off:x}")
            else:
                reject(f"Unknown note: {_show(name)}")

        # validation, in prbmap order (upstream's)
        nprobes = 0
        for entry in prbmap:
            assert isinstance(entry, _Site)
            site = entry
            pvp = providers.get(site.prv)
            if pvp is None:
                reject(f"No such provider: {_show(site.prv)}", ENOENT)
            key = (site.fun, site.prb)
            existing = pvp.pmap.lookup(
                _probe_hval(site.prv, mod, site.fun, site.prb, 0), _same_probe(key)
            )
            probe = existing if isinstance(existing, _Probe) else None
            defined = pvp.defined.get(site.prb) if probe is None else probe.defined
            if defined is None:
                reject(f"No such probe: {_show(site.prv)}:::{_show(site.prb)}", ENOENT)
            if site.sargc != defined.nargc and (not site.enabled or site.sargc != 1):
                reject(
                    f"{_show(site.prv)}:::{_show(site.prb)}"
                    f"{' (is-enabled)' if site.enabled else ''} prototype mismatch: "
                    f"{_s8(site.sargc)} passed, {_s8(1 if site.enabled else defined.nargc)} "
                    f"expected"
                )
            if probe is None:
                probe = pvp.probes.get(key)  # upstream's lookup missed it: merge (docstring)
            if probe is None:
                prv_text, fun_text, prb_text = site.text
                try:
                    check_probespec(prv_text, self.module, fun_text, prb_text)
                except NameRefused as err:
                    reject(str(err))
                nprobes += 1
                if nprobes > limits.max_probes:
                    reject(
                        f"probe count {nprobes} exceeds maximum {limits.max_probes} (max_probes)",
                        E2BIG,
                    )
                probe = pvp.probes[key] = _Probe(site.fun, site.prb, defined)
                pvp.pmap.insert(_probe_hval(site.prv, mod, site.fun, site.prb, site.off), probe)
            if len(probe.sites) >= MAX_NTP:
                reject(
                    f"probe {pvp.text}:{self.module}:{site.text[1]}:{site.text[2]} has more than "
                    f"{MAX_NTP} tracepoints",
                    E2BIG,
                )
            probe.sites.append(site)

        records: list[ResultRecord] = []
        for entry in prvmap:
            assert isinstance(entry, _Provider)
            pvp = entry
            if not pvp.probes:
                continue
            records.append(Provider(name=pvp.text, nprobes=len(pvp.probes)))
            for pentry in pvp.pmap:
                if not isinstance(pentry, _Probe):
                    continue
                first = pentry.sites[0]
                records.append(
                    Probe(
                        mod=self.module,
                        fun=first.text[1],
                        prb=first.text[2],
                        ntp=len(pentry.sites),
                        nargc=pentry.defined.nargc,
                        xargc=pentry.defined.xargc,
                    )
                )
                records.extend(pentry.defined.args)
                # upstream's order: first validated, then the others in reverse (docstring)
                sites = pentry.sites
                sites = [sites[0], *reversed(sites[1:])]
                records.extend(
                    Tracepoint(addr=base + s.off, is_enabled=s.enabled, args=s.sargs) for s in sites
                )
        records.append(Eof())
        return records

    def _prov(
        self, desc: bytes, providers: dict[bytes, _Provider], prvmap: _Htab, ndefined: int
    ) -> _Provider:
        end = len(desc)
        nul = desc.find(0)
        if nul < 0:
            reject("Incomplete note data")
        name = desc[:nul]
        p = _align4(nul + 1)
        if p + 24 > end:
            reject("Incomplete note data")
        if name in providers:
            reject(f"Duplicate provider: {_show(name)}", EEXIST)
        pvp = _Provider(name, "")
        providers[name] = pvp
        prvmap.insert(str2hval(name, 0), pvp)
        (probec,) = _U32.unpack_from(desc, p + 20)
        p += 24
        pending: list[tuple[bytes, list[bytes], list[bytes], bytes]] = []
        for _ in range(probec):
            p = _align4(p)
            nul = desc.find(0, p) if p < end else -1
            if nul < 0:
                reject("Incomplete note data")
            prb = desc[p:nul]
            p = nul + 1
            if p + 2 > end:
                reject("Incomplete note data")
            if prb in pvp.defined:
                reject(
                    f"Duplicate probe: {_show(name)}:{_show(self.module_raw)}::{_show(prb)}",
                    EEXIST,
                )
            nargc = desc[p]
            p += 1
            native = []
            for _k in range(nargc):
                nul = desc.find(0, p) if p < end else -1
                if nul < 0:
                    reject("Incomplete note data")
                native.append(desc[p:nul])
                p = nul + 1
            if p >= end:  # the xargc byte (upstream reads it even past the note)
                reject("Incomplete note data")
            xargc = desc[p]
            p += 1
            xlat = []
            argmap = bytearray()
            for _k in range(xargc):
                nul = desc.find(0, p) if p < end else -1
                if nul < 0 or nul + 1 >= end:  # the string, then its map byte, inside the note
                    reject("Incomplete note data")
                xlat.append(desc[p:nul])
                argmap.append(desc[nul + 1])
                p = nul + 2
            pvp.defined[prb] = _Defined(prb, nargc, xargc)
            if ndefined + len(pvp.defined) > self.limits.max_probes:  # before the next one
                reject(
                    f"probe count {ndefined + len(pvp.defined)} exceeds maximum "
                    f"{self.limits.max_probes} (max_probes)",
                    E2BIG,
                )
            pending.append((prb, native, xlat, bytes(argmap)))
        # our policy, after upstream's checks of this note
        pvp.text = self._name("provider", name)
        for prb, native, xlat, amap in pending:
            self._name("probe", prb)
            nargc = len(native)
            args: list[ResultRecord] = []
            if xlat and not nargc:
                reject(f"bad native argument index for arg 0: {amap[0]} (max -1)")
            for k, m in enumerate(amap):
                if m >= nargc:
                    reject(f"bad native argument index for arg {k}: {m} (max {nargc - 1})")
            if native:
                args.append(ArgsNative(args=[self._argtype(t) for t in native]))
            if xlat:
                args.append(ArgsXlat(args=[self._argtype(t) for t in xlat]))
                args.append(ArgsMap(map=list(amap)))
            pvp.defined[prb].args = tuple(args)
        return pvp

    def _argtype(self, raw: bytes) -> str:
        value = self.argtypes.get(raw)
        if value is None:
            try:
                value = decode_name("argtype", raw)
            except NameRefused as err:
                reject(str(err))
            self.argtypes[raw] = value
        return value

    def _usdt(self, desc: bytes, ntype: int, rodata: _Rodata, prbmap: _Htab) -> _Site:
        end = len(desc)
        if end < 16:
            reject("Incomplete note data")
        off, fno = _U64X2.unpack_from(desc)
        nul = desc.find(0, 16)
        if nul < 0:
            reject("Incomplete note data")
        prv = desc[16:nul]
        p = nul + 1
        if not rodata.contains(fno):
            reject("Invalid function name offset")
        nul = desc.find(0, p) if p < end else -1
        if nul < 0:
            reject("Incomplete note data")
        prb = desc[p:nul].replace(b"__", b"-")
        p = nul + 1
        fun = rodata.string(fno)  # ours: bounded, inside .rodata (upstream: unbounded strlen)
        off32 = off & 0xFFFFFFFF  # upstream keeps the offset in a uint32_t
        mod = self.module_raw
        if prbmap.lookup(_probe_hval(prv, mod, fun, prb, off32), _same_site(prv, fun, prb, off32)):
            reject(f"Duplicate probe: {_show(prv)}:{_show(mod)}:{_show(fun)}:{_show(prb)}", EEXIST)
        if p >= end:  # the source-argument count
            reject("Incomplete note data")
        sargc = desc[p]
        p += 1
        nul = desc.find(0, p) if p < end else -1
        if nul < 0:
            reject("Incomplete note data")
        sargs_raw = desc[p:nul]
        site = _Site(prv, fun, prb, off, ntype == NOTE_ENABLED, sargc, "")
        prbmap.insert(_probe_hval(prv, mod, fun, prb, off32), site)
        # our policy, after upstream's checks of this note
        site.text = (
            self._name("provider", prv),
            self._name("function", fun),
            self._name("probe", prb),
        )
        try:
            site.sargs = decode_name("sargs", sargs_raw)
        except NameRefused as err:
            message = str(err)
            if "UTF-8" in message:
                message = f'argument string "{_show(sargs_raw)}" is not valid UTF-8'
            reject(message)
        return site


def _same_probe(key: tuple[bytes, bytes]) -> Callable[[object], bool]:
    """Upstream's ``prb_cmp`` against a function-specific key with offset 0."""
    return lambda e: isinstance(e, _Probe) and (e.fun, e.prb) == key


def _same_site(prv: bytes, fun: bytes, prb: bytes, off32: int) -> Callable[[object], bool]:
    """Upstream's ``prb_cmp`` between tracepoints: offsets compared only when both are non-zero."""

    def same(e: object) -> bool:
        if not isinstance(e, _Site) or (e.prv, e.fun, e.prb) != (prv, fun, prb):
            return False
        other = e.off & 0xFFFFFFFF
        return not off32 or not other or other == off32

    return same


def _align4(value: int) -> int:
    return (value + 3) & ~3


def _probe_hval(prv: bytes, mod: bytes, fun: bytes | None, prb: bytes, off: int) -> int:
    hval = str2hval(prv, off)
    hval = str2hval(mod, hval)
    if fun is not None:
        hval = str2hval(fun, hval)
    return str2hval(prb, hval)


def _walk(data: bytes) -> Iterator[tuple[bytes, int, int, int]]:
    """Upstream's ``get_note`` loop: (name, type, descriptor start, end) of each note, in order."""
    size = len(data)
    off = 0
    while True:
        if off >= size or NHDR.size > size - off:
            reject(f"Invalid ELF note offset {off}")
        namesz, descsz, ntype = NHDR.unpack_from(data, off)
        off += NHDR.size
        if off >= size or namesz > size - off:
            reject(f"Invalid name size {_s32(namesz)}")
        name_at = off
        nul = data.find(0, off, off + namesz)
        off += _align4(namesz)
        if off >= size or descsz > size - off:
            reject(f"Invalid desc size {_s32(descsz)}")
        if nul < 0:  # a name must end inside namesz (upstream's strcmp would read on)
            reject(f"Unknown note: {_show(data[name_at : name_at + namesz])}")
        start = off
        off += _align4(descsz)
        yield data[name_at:nul], ntype, start, start + descsz
        if off >= size:
            return


class _Rodata:
    """The ``.rodata`` block: its ``sh_addr`` and its bytes."""

    __slots__ = ("addr", "data")

    def __init__(self, addr: int, data: bytes) -> None:
        self.addr = addr
        self.data = data

    def contains(self, addr: int) -> bool:
        return addr >= self.addr and addr - self.addr < len(self.data)

    def string(self, addr: int) -> bytes:
        """The C string at *addr*, looked for within DTRACE_FUNCNAMELEN bytes and .rodata."""
        off = addr - self.addr
        chunk = self.data[off : off + DTRACE_FUNCNAMELEN]
        nul = chunk.find(0)
        if nul >= 0:
            return chunk[:nul]
        if off + len(chunk) >= len(self.data):
            reject(f"function name at {addr:#x} is not NUL-terminated within {RODATA_SECTION}")
        reject(
            f'function name "{_show(chunk)}..." too long: more than {DTRACE_FUNCNAMELEN - 1} bytes'
        )
