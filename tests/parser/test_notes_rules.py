"""ELF-notes parser: one minimal broken input per rule, with the exact errno and message.

The ELF-structure rules belong to the first phase and are tested on
``LocateNotes`` (:func:`~tests.parser.elf_build.locate`, an object file read
through ``ReadAt``); the note rules belong to the second and are tested on
``ParseNoteBlocks`` (:func:`~tests.parser.elf_build.parse` of
:class:`~tests.parser.elf_build.Blocks`, no file at all).  Upstream's
messages are from ``libcommon/usdt_parser_notes.c`` and ``handle_usdt_notes``
(reference §3.7); the ELF-structure rules are ours (upstream leaves them to
libelf in the privileged daemon: CVE-2026-21996 and CVE-2026-35233 are in that
code).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from errno import E2BIG, EEXIST, EINVAL, ENOENT

import pytest

from common.limits import ParseLimits
from common.names import printable
from common.records import Eof, Err, NotesLocation
from tests.parser.elf_build import (
    MODULE,
    Blocks,
    CountingReader,
    NoteProbe,
    NoteProvider,
    NoteSite,
    blocks_of,
    build_object,
    helper,
    locate,
    note,
    parse,
    patch,
    prov_desc,
    set_ehdr,
    set_shdr,
    u32,
    usdt_desc,
)

MOD = MODULE.decode()
PROV = NoteProvider("prv", [NoteProbe("go", ["int"]), NoteProbe("stop")])
SITES = [
    NoteSite("prv", "go", "main", 0x1100, sargs="-4@%edi"),
    NoteSite("prv", "stop", "main", 0x1200),
]


def valid() -> bytes:
    return build_object([PROV], SITES).data


def err(records: Sequence[object]) -> tuple[int, str]:
    assert len(records) == 1 and isinstance(records[0], Err), records
    return records[0].errno, records[0].message


def notes_only(*raw: bytes, sites: list[NoteSite] | None = None) -> Blocks:
    """The blocks of a ParseNoteBlocks whose notes are exactly *raw* ('main' is in .rodata)."""
    obj = build_object([PROV], sites if sites is not None else SITES[:1], notes=b"".join(raw))
    return blocks_of(obj)


FNO = build_object([PROV], SITES).function_addrs["main"]


def usdt(prv: bytes, prb: bytes, *, off: int = 0x1100, fno: int = FNO, sargc: int = 1,
         sargs: bytes = b"-4@%edi", ntype: int = 1) -> bytes:  # fmt: skip
    desc = struct.pack("<QQ", off, fno) + prv + b"\0" + prb + b"\0" + bytes([sargc]) + sargs + b"\0"
    return note(b"usdt", ntype, desc)


PROV_NOTE = note(b"prov", 1, prov_desc(PROV))


def test_the_valid_object_is_accepted() -> None:
    assert not isinstance(parse(valid())[0], Err)


# --- ELF structure ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"", f"{MOD}: not an ELF file"),
        (lambda d: b"\x7fEL", f"{MOD}: not an ELF file"),
        (lambda d: b"MZ" + d[2:], f"{MOD}: not an ELF file"),
        (lambda d: d[:10], f"{MOD}: truncated ELF header (10 bytes)"),
        (lambda d: patch(d, 4, b"\x01"), f"{MOD}: unsupported ELF class 1 (only ELFCLASS64)"),
        (
            lambda d: patch(d, 5, b"\x02"),
            f"{MOD}: unsupported ELF data encoding 2 (only little-endian)",
        ),
        (lambda d: patch(d, 6, b"\x00"), f"{MOD}: unsupported ELF version 0"),
        (lambda d: d[:63], f"{MOD}: truncated ELF header (63 bytes)"),
        (lambda d: set_ehdr(d, machine=183), f"{MOD}: unsupported ELF machine 183 (only x86_64)"),
        (lambda d: set_ehdr(d, type=1), f"{MOD}: unsupported ELF type 1 (only ET_EXEC and ET_DYN)"),
        (lambda d: set_ehdr(d, shoff=0), f"no .note.usdt section in {MOD}"),
        # CVE-2026-21996 class: a section header size of 0 (upstream divided by it)
        (lambda d: set_ehdr(d, shentsize=0), f"{MOD}: invalid section header size 0, expected 64"),
        (
            lambda d: set_ehdr(d, shentsize=40),
            f"{MOD}: invalid section header size 40, expected 64",
        ),
        (
            lambda d: set_ehdr(d, shoff=len(d)),
            f"{MOD}: section header table offset {len(valid()):#x} past the end of the file "
            f"({len(valid())} bytes)",
        ),
        (
            lambda d: set_ehdr(d, shoff=(1 << 64) - 8),
            f"{MOD}: section header table offset 0xfffffffffffffff8 past the end of the file "
            f"({len(valid())} bytes)",
        ),
        (
            lambda d: set_ehdr(d, shnum=0xFF00),
            f"{MOD}: section header table (65280 entries at offset "
            f"{build_object([PROV], SITES).shoff:#x}) extends past the end of the file "
            f"({len(valid())} bytes)",
        ),
        (lambda d: set_ehdr(d, shstrndx=0), f"no .note.usdt section in {MOD}"),
        (
            lambda d: set_ehdr(d, shstrndx=4),
            f"{MOD}: section name table index 4 out of range (4 sections)",
        ),
        (lambda d: set_ehdr(d, shstrndx=0xFF05), f"{MOD}: invalid section name table index 0xff05"),
        (
            lambda d: set_ehdr(d, shstrndx=2),
            f"{MOD}: section name table (section 2) is not SHT_STRTAB",
        ),
    ],
)
def test_elf_header_rules(mutate: object, message: str) -> None:
    data = mutate(valid())  # type: ignore[operator]
    assert err(locate(data)) == (EINVAL, message)


def test_section_table_in_extended_numbering_is_followed() -> None:
    obj = build_object([PROV], SITES)
    data = set_ehdr(obj.data, shnum=0, shstrndx=0xFFFF)
    data = set_shdr(obj, 0, data, size=obj.shnum, link=3)
    assert locate(data) == locate(obj.data)
    # a huge extended count is bounded by the file, never allocated or looped over
    data = set_shdr(obj, 0, data, size=1 << 40)
    assert err(locate(data)) == (
        EINVAL,
        f"{MOD}: section header table (1099511627776 entries at offset {obj.shoff:#x}) extends "
        f"past the end of the file ({len(obj.data)} bytes)",
    )


def test_a_section_table_bigger_than_the_byte_budget_is_e2big() -> None:
    obj = build_object([PROV], SITES)
    big = obj.data + bytes(70 * 64)
    data = set_ehdr(big, shnum=obj.shnum + 70)
    limits = ParseLimits(max_object_bytes=4096)
    errno, message = err(locate(data, limits=limits))
    assert errno == E2BIG
    assert message == (
        f"reading section header table needs {64 + 74 * 64} bytes of the object, more than "
        f"4096 (max_object_bytes)"
    )


def test_section_name_past_the_string_table_is_refused() -> None:
    """CVE-2026-35233 class: an out-of-table string offset is checked, never followed."""
    obj = build_object([PROV], SITES)
    assert err(locate(set_shdr(obj, 1, name=0x4000))) == (
        EINVAL,
        f"{MOD}: section 1: name offset 0x4000 outside the section name table (30 bytes)",
    )
    assert err(locate(set_shdr(obj, 1, name=(1 << 32) - 1))) == (
        EINVAL,
        f"{MOD}: section 1: name offset 0xffffffff outside the section name table (30 bytes)",
    )


def test_section_name_without_its_nul_is_refused() -> None:
    obj = build_object([PROV], SITES)
    data = set_shdr(obj, 3, size=29)  # cut the table's last NUL off
    data = set_shdr(obj, 1, data, name=20)  # ".shstrtab" is the last name
    assert err(locate(data)) == (
        EINVAL,
        f"{MOD}: section 1: name at offset 0x14 is not NUL-terminated in the section name table",
    )


@pytest.mark.parametrize(
    ("index", "fields", "what"),
    [
        (3, {"offset": 1 << 40}, "section name table (section 3, offset 0x10000000000, size 0x1e)"),
        (3, {"size": 1 << 40}, "section name table (section 3"),
        (2, {"offset": (1 << 64) - 1}, ".rodata (section 2, offset 0xffffffffffffffff"),
        (2, {"size": (1 << 64) - 1}, ".rodata (section 2"),
    ],
)
def test_section_bounds(index: int, fields: dict[str, int], what: str) -> None:
    obj = build_object([PROV], SITES)
    errno, message = err(locate(set_shdr(obj, index, None, **fields)))
    assert errno == EINVAL
    assert message.startswith(f"{MOD}: {what}")
    assert message.endswith(f"extends past the end of the file ({len(obj.data)} bytes)")


def test_notes_section_past_eof_and_overlapping_offsets() -> None:
    obj = build_object([PROV], SITES)
    for fields in ({"size": len(obj.data)}, {"size": 1 << 40}, {"offset": (1 << 64) - 4}):
        errno, message = err(locate(set_shdr(obj, 1, None, **fields)))
        assert errno == EINVAL
        assert message.startswith(f"{MOD}: .note.usdt (section 1, offset ")
        assert message.endswith(f"extends past the end of the file ({len(obj.data)} bytes)")
    # a notes section overlapping the section headers is just bytes: located, parsed as notes
    data = set_shdr(obj, 1, offset=obj.shoff, size=64)
    assert isinstance(locate(data)[0], NotesLocation)
    errno, _ = err(parse(data))
    assert errno == EINVAL


def test_sections_larger_than_the_budget_are_e2big_and_never_read() -> None:
    obj = build_object([PROV], SITES, extra_notes=[note(b"dver", 1, bytes(8192))])
    reader = CountingReader(obj.data)
    limit = obj.notes_size + obj.rodata_size - 1
    out = locate(obj, reader=reader, limits=ParseLimits(max_object_bytes=limit))
    assert err(out) == (
        E2BIG,
        f"sections .note.usdt and .rodata hold {limit + 1} bytes ({obj.notes_size} + "
        f"{obj.rodata_size}), more than {limit} (max_object_bytes)",
    )
    assert all(offset < obj.notes_offset for offset, _ in reader.calls[:1])
    assert not any(obj.notes_offset <= offset < obj.shstrtab_offset for offset, _ in reader.calls)
    loc = locate(obj, limits=ParseLimits(max_object_bytes=limit + 1))[0]
    assert isinstance(loc, NotesLocation) and loc.notes_size + loc.rodata_size == limit + 1


def test_blocks_larger_than_the_budget_are_e2big() -> None:
    blocks = blocks_of(build_object([PROV], SITES, rodata_size=8192))
    total = len(blocks.notes) + len(blocks.rodata)
    assert err(parse(blocks, limits=ParseLimits(max_object_bytes=total - 1))) == (
        E2BIG,
        f"blocks .note.usdt and .rodata hold {total} bytes ({len(blocks.notes)} + 8192), more "
        f"than {total - 1} (max_object_bytes)",
    )
    assert parse(blocks, limits=ParseLimits(max_object_bytes=total))[-1] == Eof()


def test_missing_sections_use_upstreams_message() -> None:
    obj = build_object([PROV], SITES)
    assert err(locate(set_shdr(obj, 1, type=1))) == (EINVAL, f"no .note.usdt section in {MOD}")
    assert err(locate(set_shdr(obj, 2, type=8))) == (EINVAL, f"no .rodata section in {MOD}")
    assert err(locate(set_shdr(obj, 2, name=0))) == (EINVAL, f"no .rodata section in {MOD}")


def test_misaligned_notes_section() -> None:
    obj = build_object([PROV], SITES)
    assert err(locate(set_shdr(obj, 1, offset=obj.notes_offset + 2))) == (
        EINVAL,
        "Pointer to note header not aligned",
    )


def test_a_file_that_shrank_under_the_parser_is_refused() -> None:
    obj = build_object([PROV], SITES)
    data = obj.data
    assert err(locate(data[:-1], size=len(data))) == (
        EINVAL,
        f"short read of section header table at offset {obj.shoff:#x}: 255 of 256 bytes "
        f"(the file changed?)",
    )


# --- the note walk ---------------------------------------------------------------------


def test_empty_notes_section() -> None:
    assert err(parse(notes_only())) == (EINVAL, "Invalid ELF note offset 0")


def test_note_header_cut_short() -> None:
    assert err(parse(notes_only(PROV_NOTE, b"\0" * 8))) == (
        EINVAL,
        f"Invalid ELF note offset {len(PROV_NOTE)}",
    )


def test_name_size_overflowing_the_section() -> None:
    raw = struct.pack("<III", 0xFFFFFFFF, 0, 1) + b"prov"
    assert err(parse(notes_only(raw))) == (EINVAL, "Invalid name size -1")
    raw = struct.pack("<III", 9, 0, 1) + b"prov\0\0\0\0"
    assert err(parse(notes_only(raw))) == (EINVAL, "Invalid name size 9")
    raw = struct.pack("<III", 0, 0, 1)  # header exactly at the end: no room for any name
    assert err(parse(notes_only(raw))) == (EINVAL, "Invalid name size 0")


def test_desc_size_overflowing_the_section() -> None:
    raw = struct.pack("<III", 5, 0x80000000, 1) + b"prov\0\0\0\0" + b"x" * 4
    assert err(parse(notes_only(raw))) == (EINVAL, "Invalid desc size -2147483648")
    raw = struct.pack("<III", 5, 5, 1) + b"prov\0\0\0\0" + b"abcd"
    assert err(parse(notes_only(raw))) == (EINVAL, "Invalid desc size 5")
    # upstream's quirk kept: a last note with an empty descriptor ends exactly at the end
    raw = struct.pack("<III", 5, 0, 1) + b"dver\0\0\0\0"
    assert err(parse(notes_only(raw))) == (EINVAL, "Invalid desc size 0")


def test_unknown_note() -> None:
    assert err(parse(notes_only(note(b"what", 1, b"data")))) == (EINVAL, "Unknown note: what")
    assert err(parse(notes_only(note(b"\x1b[2J", 1, b"data")))) == (
        EINVAL,
        "Unknown note: \\x1b[2J",
    )
    # a name without its NUL inside namesz is unknown (upstream's strcmp would read on)
    raw = struct.pack("<III", 4, 4, 1) + b"prov" + b"\0\0\0\0"
    assert err(parse(notes_only(raw))) == (EINVAL, "Unknown note: prov")


def test_dver_and_utsn_are_ignored_and_their_type_is_not_checked() -> None:
    extra = [note(b"dver", 99, b"anything"), note(b"utsn", 0, b"x")]
    obj = build_object([PROV], SITES, extra_notes=extra)
    assert parse(obj) == parse(build_object([PROV], SITES))
    assert parse(blocks_of(obj)) == parse(blocks_of(build_object([PROV], SITES)))


# --- prov notes ------------------------------------------------------------------------


def _prov_raw(desc: bytes) -> bytes:
    return note(b"prov", 1, desc)


@pytest.mark.parametrize(
    "desc",
    [
        b"prv",  # name without NUL
        b"prv\0" + bytes(20),  # the six words cut short
        b"prv\0" + struct.pack("<6I", 0, 0, 0, 0, 0, 1),  # one probe, no name
        b"prv\0" + struct.pack("<6I", 0, 0, 0, 0, 0, 1) + b"go\0",  # no nargc/xargc bytes
        b"prv\0" + struct.pack("<6I", 0, 0, 0, 0, 0, 1) + b"go\0\x01in",  # native type cut
        b"prv\0" + struct.pack("<6I", 0, 0, 0, 0, 0, 1) + b"go\0\x01int\0",  # no xargc byte
        b"prv\0" + struct.pack("<6I", 0, 0, 0, 0, 0, 1) + b"go\0\x01int\0\x01long\0",  # no map
        b"prv\0" + struct.pack("<6I", 0, 0, 0, 0, 0, 2) + b"go\0\0\0\0",  # second probe missing
    ],
)
def test_incomplete_prov_note(desc: bytes) -> None:
    assert err(parse(notes_only(_prov_raw(desc)))) == (EINVAL, "Incomplete note data")


def test_huge_probe_count_ends_at_the_descriptor() -> None:
    desc = b"prv\0" + struct.pack("<6I", 0, 0, 0, 0, 0, 0xFFFFFFFF) + b"go\0\0\0"
    assert err(parse(notes_only(_prov_raw(desc)))) == (EINVAL, "Incomplete note data")


def test_duplicate_provider() -> None:
    assert err(parse(notes_only(PROV_NOTE, PROV_NOTE))) == (EEXIST, "Duplicate provider: prv")


def test_duplicate_probe_in_a_prov_note() -> None:
    prov = NoteProvider("prv", [NoteProbe("go"), NoteProbe("go", ["int"])])
    assert err(parse(notes_only(_prov_raw(prov_desc(prov))))) == (
        EEXIST,
        f"Duplicate probe: prv:{MOD}::go",
    )


@pytest.mark.parametrize(
    ("prov", "message"),
    [
        (NoteProvider("a/b", [NoteProbe("go")]), "provider name \"a/b\" contains forbidden character '/'"),
        (NoteProvider("../../../../unsafe", [NoteProbe("go")]), "provider name \"../../../../unsafe\" contains forbidden character '/'"),
        (NoteProvider("p" * 64, [NoteProbe("go")]), f'provider name "{"p" * 64}" too long: 64 bytes > 63'),
        (NoteProvider("prv", [NoteProbe("a:b")]), "probe name \"a:b\" contains forbidden character ':'"),
        (NoteProvider("prv", [NoteProbe("go", [""])]), "argument type is empty"),
        (NoteProvider("prv", [NoteProbe("go", ["in\tt"])]), "argument type \"in\\tt\" contains forbidden character '\\t'"),
        (NoteProvider("prv", [NoteProbe("go", ["int"], [("long", 1)])]), "bad native argument index for arg 0: 1 (max 0)"),
        (NoteProvider("prv", [NoteProbe("go", [], [("long", 0)])]), "bad native argument index for arg 0: 0 (max -1)"),
    ],
)  # fmt: skip
def test_prov_note_policy(prov: NoteProvider, message: str) -> None:
    assert err(parse(notes_only(_prov_raw(prov_desc(prov))))) == (EINVAL, message)


def test_non_utf8_provider_name() -> None:
    desc = b"pr\xffv\0\0\0\0" + struct.pack("<6I", 0, 0, 0, 0, 0, 0)
    assert err(parse(notes_only(_prov_raw(desc)))) == (
        EINVAL,
        'provider name "' + printable(b"pr\xffv") + '" is not valid UTF-8',
    )


def test_module_name_policy_and_termination() -> None:
    """Both phases check the helper: LocateNotes (its messages name the module) and
    ParseNoteBlocks (its records carry it)."""
    dh = bytearray(helper())
    dh[:64] = b"m" * 64
    cases = [
        (helper(b"a:b"), "module name \"a:b\" contains forbidden character ':'"),
        (bytes(dh), "module name (dofhp_mod) is not NUL-terminated within 64 bytes"),
        (b"short", "helper size incorrect: expected 80, not 5"),
    ]
    blocks = blocks_of(build_object([PROV], SITES))
    for bad, message in cases:
        assert err(locate(valid(), dh=bad)) == (EINVAL, message)
        assert err(parse(blocks, dh=bad)) == (EINVAL, message)


# --- usdt notes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "desc",
    [
        struct.pack("<Q", 0x1100),  # fewer than 16 bytes
        struct.pack("<QQ", 0x1100, FNO) + b"prv",  # provider without NUL
        struct.pack("<QQ", 0x1100, FNO) + b"prv\0go",  # probe without NUL
        struct.pack("<QQ", 0x1100, FNO) + b"prv\0go\0",  # no argument count
        struct.pack("<QQ", 0x1100, FNO) + b"prv\0go\0\x01-4@%edi",  # argument string cut
    ],
)
def test_incomplete_usdt_note(desc: bytes) -> None:
    assert err(parse(notes_only(PROV_NOTE, note(b"usdt", 1, desc)))) == (
        EINVAL,
        "Incomplete note data",
    )


@pytest.mark.parametrize("fno", [0, FNO - FNO % 0x1000 - 1, (1 << 64) - 1])
def test_function_name_address_outside_rodata(fno: int) -> None:
    obj = build_object([PROV], SITES[:1])
    out = parse(notes_only(PROV_NOTE, usdt(b"prv", b"go", fno=fno)))
    assert err(out) == (EINVAL, "Invalid function name offset"), obj.rodata_addr
    end = obj.rodata_addr + obj.rodata_size
    assert err(parse(notes_only(PROV_NOTE, usdt(b"prv", b"go", fno=end)))) == (
        EINVAL,
        "Invalid function name offset",
    )


def test_function_name_unterminated_or_too_long() -> None:
    obj = build_object([PROV], SITES[:1], rodata_prefix=b"\0" + b"f" * 200)
    start = obj.rodata_addr + 1
    data = build_object(
        [PROV], SITES[:1], rodata_prefix=b"\0" + b"f" * 200,
        notes=PROV_NOTE + usdt(b"prv", b"go", fno=start),
    ).data  # fmt: skip
    errno, message = err(parse(data))
    assert errno == EINVAL
    assert message == f'function name "{"f" * 128}..." too long: more than 127 bytes'
    # the last bytes of .rodata without a NUL: the name would run past the section
    cut = b"\0" + b"g" * 10
    obj = build_object([PROV], [], rodata_prefix=cut, notes=PROV_NOTE)
    last = obj.rodata_addr + 1
    data = build_object(
        [PROV], [], rodata_prefix=cut, notes=PROV_NOTE + usdt(b"prv", b"go", fno=last)
    ).data
    assert err(parse(data)) == (
        EINVAL,
        f"function name at {last:#x} is not NUL-terminated within .rodata",
    )


def test_duplicate_tracepoint() -> None:
    one = usdt(b"prv", b"go")
    assert err(parse(notes_only(PROV_NOTE, one, one))) == (
        EEXIST,
        f"Duplicate probe: prv:{MOD}:main:go",
    )
    # the probe-name conversion happens before the duplicate check
    a, b = usdt(b"prv", b"st__op", sargc=0, sargs=b""), usdt(b"prv", b"st-op", sargc=0, sargs=b"")
    assert err(parse(notes_only(PROV_NOTE, a, b))) == (
        EEXIST,
        f"Duplicate probe: prv:{MOD}:main:st-op",
    )


def test_no_such_provider_and_probe() -> None:
    assert err(parse(notes_only(PROV_NOTE, usdt(b"other", b"go")))) == (
        ENOENT,
        "No such provider: other",
    )
    assert err(parse(notes_only(PROV_NOTE, usdt(b"prv", b"gone")))) == (
        ENOENT,
        "No such probe: prv:::gone",
    )
    # a usdt note before its prov note is fine: validation comes after the walk
    assert not isinstance(parse(notes_only(usdt(b"prv", b"go"), PROV_NOTE))[0], Err)


def test_prototype_mismatch() -> None:
    assert err(parse(notes_only(PROV_NOTE, usdt(b"prv", b"go", sargc=2)))) == (
        EINVAL,
        "prv:::go prototype mismatch: 2 passed, 1 expected",
    )
    assert err(parse(notes_only(PROV_NOTE, usdt(b"prv", b"go", sargc=200)))) == (
        EINVAL,
        "prv:::go prototype mismatch: -56 passed, 1 expected",  # %hhd, as upstream
    )
    # is-enabled: the count may be nargc or 1
    stop_en = usdt(b"prv", b"stop", sargc=2, ntype=2)
    assert err(parse(notes_only(PROV_NOTE, stop_en))) == (
        EINVAL,
        "prv:::stop (is-enabled) prototype mismatch: 2 passed, 1 expected",
    )
    for sargc in (0, 1):
        ok = usdt(b"prv", b"stop", sargc=sargc, ntype=2)
        assert not isinstance(parse(notes_only(PROV_NOTE, ok))[0], Err)


def test_sargs_policy() -> None:
    bad = usdt(b"prv", b"go", sargs=b"-4@%edi\x1b[0m")
    assert err(parse(notes_only(PROV_NOTE, bad))) == (
        EINVAL,
        "argument string \"-4@%edi\\x1b[0m\" contains forbidden character '\\x1b'",
    )
    bad = usdt(b"prv", b"go", sargs=b"\xff")
    assert err(parse(notes_only(PROV_NOTE, bad))) == (
        EINVAL,
        'argument string "' + printable(b"\xff") + '" is not valid UTF-8',
    )
    bad = usdt(b"prv", b"go", sargs=b"x" * 4097)
    errno, message = err(parse(notes_only(PROV_NOTE, bad)))
    assert errno == EINVAL and message.endswith("too long: 4097 bytes > 4096")


def test_usdt_names_policy() -> None:
    assert err(parse(notes_only(PROV_NOTE, usdt(b"prv", b"g/o")))) == (
        EINVAL,
        "probe name \"g/o\" contains forbidden character '/'",
    )
    assert err(parse(notes_only(PROV_NOTE, usdt(b"pr:v", b"go")))) == (
        EINVAL,
        "provider name \"pr:v\" contains forbidden character ':'",
    )


def test_function_name_policy() -> None:
    obj = build_object([PROV], [NoteSite("prv", "go", "ma:in", 0x10, sargs="-4@%edi")])
    assert err(parse(obj)) == (EINVAL, "function name \"ma:in\" contains forbidden character ':'")


def test_probespec_too_long_for_a_file_name() -> None:
    prov = NoteProvider("p" * 63, [NoteProbe("q" * 63)])
    fun = "f" * 127
    obj = build_object([prov], [NoteSite("p" * 63, "q" * 63, fun, 0x10)])
    errno, message = err(parse(obj))
    assert errno == EINVAL
    assert message.endswith(f"too long for a file name: {63 + len(MOD) + 127 + 63 + 3} bytes > 255")


def test_offsets_above_32_bits_and_address_overflow() -> None:
    assert err(parse(notes_only(PROV_NOTE, usdt(b"prv", b"go", off=1 << 32)))) == (
        EINVAL,
        "tracepoint offset 0x100000000 does not fit 32 bits",
    )
    data = notes_only(PROV_NOTE, usdt(b"prv", b"go", off=0x2000))
    assert err(parse(data, dh=helper(addr=(1 << 64) - 0x1000))) == (
        EINVAL,
        "tracepoint address overflow: fffffffffffff000 + 2000",
    )


# --- limits ----------------------------------------------------------------------------


def test_limits() -> None:
    provs = [NoteProvider(f"p{i}", [NoteProbe("a"), NoteProbe("b")]) for i in range(3)]
    sites = [NoteSite(f"p{i}", n, "main", 0x10 * (i * 2 + j + 1)) for i in range(3)
             for j, n in enumerate("ab")]  # fmt: skip
    obj = build_object(provs, sites)
    assert err(parse(obj, limits=ParseLimits(max_providers=2))) == (
        E2BIG,
        "provider count 3 exceeds maximum 2 (max_providers)",
    )
    assert err(parse(obj, limits=ParseLimits(max_probes=5))) == (
        E2BIG,
        "probe count 6 exceeds maximum 5 (max_probes)",
    )
    assert err(parse(obj, limits=ParseLimits(max_tracepoints=5))) == (
        E2BIG,
        "tracepoint count 6 exceeds maximum 5 (max_tracepoints)",
    )
    assert not isinstance(
        parse(obj, limits=ParseLimits(max_providers=3, max_probes=6, max_tracepoints=6))[0], Err
    )


def test_read_budgets() -> None:
    obj = build_object([PROV], SITES)
    # header, section table, section names: three reads (never the sections' contents)
    assert err(locate(obj, limits=ParseLimits(max_object_reads=2))) == (
        E2BIG,
        "reading section name table needs more than 2 object reads (max_object_reads)",
    )
    assert isinstance(locate(obj, limits=ParseLimits(max_object_reads=3))[0], NotesLocation)


def test_big_sections_are_located_without_reading_them() -> None:
    filler = note(b"dver", 1, bytes(3 << 20))  # 3 MiB of ignored note
    obj = build_object([PROV], SITES, extra_notes=[filler], rodata_size=2 << 20)
    reader = CountingReader(obj.data)
    assert isinstance(locate(obj, reader=reader)[0], NotesLocation)
    assert len(reader.calls) == 3 and reader.total < 512
    assert parse(obj)[-1] == Eof()


def test_a_big_section_name_table_is_read_in_bounded_chunks() -> None:
    obj = build_object([PROV], SITES)
    big = obj.data + bytes(3 << 20)  # 3 MiB of section names (NULs) after the table
    data = set_shdr(obj, 3, big, offset=len(obj.data), size=3 << 20)
    data = set_shdr(obj, 1, data, name=0)  # the names now point into the NULs: no match
    reader = CountingReader(data)
    assert err(locate(data, reader=reader)) == (EINVAL, f"no .note.usdt section in {MOD}")
    assert max(size for _, size in reader.calls) == 1 << 20
    assert len(reader.calls) == 2 + 3
    assert err(locate(data, limits=ParseLimits(max_object_reads=4))) == (
        E2BIG,
        "reading section name table needs more than 4 object reads (max_object_reads)",
    )


def test_desc_contents_never_reach_past_their_note() -> None:
    """A usdt note whose strings run into the next note is incomplete, not glued together."""
    desc = struct.pack("<QQ", 0x1100, FNO) + b"prv\0go\0\x01-4@"
    raw = note(b"usdt", 1, desc) + note(b"dver", 1, b"%edi\0")
    assert err(parse(notes_only(PROV_NOTE, raw))) == (EINVAL, "Incomplete note data")


def test_usdt_desc_helper_matches() -> None:
    site = NoteSite("prv", "go", "main", 0x1100, sargs="-4@%edi")
    assert note(b"usdt", 1, usdt_desc(site, FNO)) == usdt(b"prv", b"go")
    assert u32(1) == b"\x01\0\0\0"


def test_probe_limit_is_applied_inside_one_prov_note() -> None:
    """A prov note of millions of probes stops at the limit, not after building them all."""
    body = bytearray(b"prv\0" + struct.pack("<6I", 0, 0, 0, 0, 0, 0xFFFFFFFF))
    for i in range(12):
        body += bytes(-len(body) % 4) + b"p%d\0\0\0" % i
    assert err(
        parse(notes_only(note(b"prov", 1, bytes(body))), limits=ParseLimits(max_probes=10))
    ) == (
        E2BIG,
        "probe count 11 exceeds maximum 10 (max_probes)",
    )


def test_many_tiny_notes_are_walked_quickly() -> None:
    raw = note(b"dver", 1, b"x") * 65536 + PROV_NOTE  # 1 MiB of notes
    assert parse(notes_only(raw)) == [Eof()]


def test_note_count_is_bounded() -> None:
    limits = ParseLimits(max_tracepoints=10, max_providers=2)
    raw = PROV_NOTE + note(b"dver", 1, b"x") * 4200
    assert err(parse(notes_only(raw), limits=limits)) == (
        E2BIG,
        "note count 4109 exceeds maximum 4108 (max_tracepoints + max_providers + 4096)",
    )
    assert not isinstance(
        parse(notes_only(PROV_NOTE + note(b"dver", 1, b"x") * 4000), limits=limits)[0], Err
    )
