"""Fuzz inputs for the ELF-notes parser: valid objects from a random model, then mutations.

Structure-aware: :func:`random_object` draws providers, probes (argument
types, translations), sites (several per probe and function, is-enabled
ones, ``__`` names) and an ELF type, and :func:`common.notes_build.build_object`
writes the object.  :func:`targeted` then changes one thing a rule reads:
an ELF header field (ident, type, machine, ``e_shoff``, ``e_shentsize``,
``e_shnum``, ``e_shstrndx``), a field of one section header (name, type,
address, offset, size, link — boundary values, other sections' offsets),
a note header (``namesz``, ``descsz``, type), a byte of a note descriptor (to
NUL, ``/``, ``:``, ``_``, 0xff, …), a ``usdt`` note's site offset or
function-name address (the edges of ``.rodata``, 2^32, 2^64 − 1), or the
note list itself (a note duplicated, dropped, moved, or an unknown note
added).  :func:`byte_level` flips, inserts, deletes, truncates and splices.
Every draw comes from one ``random.Random``: a seed reproduces a run.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

from common.dof_build import build_helper
from common.elf_abi import EHDR, ET_DYN, ET_EXEC, NHDR, SHDR
from common.notes_build import BuiltObject, NoteProbe, NoteProvider, NoteSite, build_object, note

_NAMES = ["p", "probe", "tick", "a-b", "x" * 63, "x" * 64, "ünï", ".", "..", "a/b", "a:b", "",
          "\x01ctl", "f" * 127, "f" * 128, "a__b"]  # fmt: skip
_TYPES = ["int", "char *", "long", "struct foo *", "t" * 127, "t" * 128, "uint64_t", "\x7f", ""]
_MODULES = [b"a.out", b"libfoo.so.1", b"m" * 63, b"m" * 64, b"", b"..", b"a/b", b"\xff\xfe"]
_SARGS = ["", "-4@%edi", "-4@%edi 8@%rsi", "8@%rax", "x" * 300, "\x1b[0m", "1@%dil -2@%ax"]

_EHDR_FIELDS = ["type", "machine", "version", "shoff", "shentsize", "shnum", "shstrndx"]
_EHDR_AT = {"type": (16, "H"), "machine": (18, "H"), "version": (20, "I"), "shoff": (40, "Q"),
            "shentsize": (58, "H"), "shnum": (60, "H"), "shstrndx": (62, "H")}  # fmt: skip
_SHDR_AT = {"name": (0, "I"), "type": (4, "I"), "addr": (16, "Q"), "offset": (24, "Q"),
            "size": (32, "Q"), "link": (40, "I")}  # fmt: skip
_FMT_SIZE = {"B": 1, "H": 2, "I": 4, "Q": 8}


@dataclass
class NotesCase:
    """One fuzz input: the helper the host would build, the object file, how it was made."""

    helper: bytes
    data: bytes
    how: str


def _pick_name(rng: random.Random, sane: float = 0.92) -> str:
    if rng.random() < sane:
        return rng.choice(["p", "probe", "tick", "fn", "main", "do_work", "a__b"]) + str(
            rng.randrange(20)
        )
    return rng.choice(_NAMES)


def random_object(rng: random.Random) -> tuple[list[NoteProvider], list[NoteSite], int]:
    providers = []
    sites: list[NoteSite] = []
    off = rng.choice([0x1000, 0x401000, 0])
    for _ in range(rng.choice([1, 1, 2, 3])):
        prv = _pick_name(rng)
        probes = []
        for _ in range(rng.choice([1, 2, 3, 5])):
            nargc = rng.choice([0, 0, 1, 2, 3])
            native = [rng.choice(_TYPES[:4]) if rng.random() < 0.95 else rng.choice(_TYPES)
                      for _ in range(nargc)]  # fmt: skip
            xargc = rng.choice([0, 0, 1, nargc]) if nargc else 0
            xlat = [(rng.choice(_TYPES[:4]), rng.randrange(nargc)) for _ in range(xargc)]
            name = _pick_name(rng)
            probes.append(NoteProbe(name.replace("__", "-"), native, xlat))
            for _ in range(rng.choice([0, 1, 1, 2])):
                off += rng.choice([1, 4, 8, 0x10])
                enabled = rng.random() < 0.25
                sargs = " ".join(f"-4@%e{r}x" for r in "abcd"[:nargc])
                sargc = 1 if enabled else nargc
                if rng.random() < 0.05:
                    sargs = rng.choice(_SARGS)
                if rng.random() < 0.05:
                    sargc = rng.randrange(256)
                fun = rng.choice(["main", "helper", "f" + str(rng.randrange(5))])
                sites.append(NoteSite(prv, name, fun, off, enabled, sargc, sargs))
        providers.append(NoteProvider(prv, probes))
    rng.shuffle(sites)
    return providers, sites, rng.choice([ET_DYN, ET_DYN, ET_EXEC])


def random_helper(rng: random.Random) -> bytes:
    mod = rng.choice(_MODULES[:3]) if rng.random() < 0.95 else rng.choice(_MODULES)
    if len(mod) > 63 and rng.random() < 0.5:
        mod = mod[:63]
    addr = rng.choice([0, 0x7F0000000000, 0x555555554000, 0xFFFFFFFFFFFFF000])
    return build_helper(mod, addr, 0)


def _interesting(
    rng: random.Random, current: int, size: int, file_len: int, extra: list[int]
) -> int:
    top = (1 << (8 * size)) - 1
    choices = [0, 1, 2, 3, 4, 7, 8, 16, 40, 63, 64, 65, 0x7F, 0x80, 0xFF, 0xFF00, 0xFFFF,
               top, top - 1, top >> 1, (top >> 1) + 1, current + 1, current - 1, current * 2,
               file_len, file_len - 1, file_len + 1, 1 << 32, rng.getrandbits(8 * size),
               *extra]  # fmt: skip
    return rng.choice(choices) & top


def _set(data: bytearray, at: int, fmt: str, value: int) -> int:
    (old,) = struct.unpack_from("<" + fmt, data, at)
    struct.pack_into("<" + fmt, data, at, value)
    return int(old)


def _notes_index(obj: BuiltObject) -> list[tuple[int, int, int, bytes]]:
    """(offset in file, namesz, descsz, name) of each note of a valid object."""
    out = []
    off = obj.notes_offset
    end = obj.notes_offset + obj.notes_size
    while off + NHDR.size <= end:
        namesz, descsz, _t = NHDR.unpack_from(obj.data, off)
        name = obj.data[off + 12 : off + 12 + namesz].rstrip(b"\0")
        out.append((off, namesz, descsz, name))
        off += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return out


def targeted(rng: random.Random, obj: BuiltObject, data: bytearray) -> str:
    """Change one thing a rule reads; returns a description."""
    kinds: list[Callable[[], str]] = []
    offsets = [obj.notes_offset, obj.rodata_offset, obj.shstrtab_offset, obj.shoff]

    def ident() -> str:
        i = rng.randrange(16)
        old = data[i]
        data[i] = rng.choice([0, 1, 2, 3, 0x7F, 0xFF, old ^ 1])
        return f"e_ident[{i}] {old:#x}->{data[i]:#x}"

    kinds.append(ident)
    for name in _EHDR_FIELDS:

        def ehdr(name: str = name) -> str:
            at, fmt = _EHDR_AT[name]
            value = _interesting(rng, 0, _FMT_SIZE[fmt], len(data), [obj.shnum, *offsets])
            old = _set(data, at, fmt, value)
            return f"e_{name} {old:#x}->{value:#x}"

        kinds.append(ehdr)
    for index in range(obj.shnum):
        for name, (at, fmt) in _SHDR_AT.items():

            def shdr(index: int = index, name: str = name, at: int = at, fmt: str = fmt) -> str:
                where = obj.shoff + index * SHDR.size + at
                if where + _FMT_SIZE[fmt] > len(data):
                    return "section header out of data"
                extra = [*offsets, obj.rodata_addr, obj.rodata_size, obj.notes_size, 20, 12]
                value = _interesting(rng, 0, _FMT_SIZE[fmt], len(data), extra)
                old = _set(data, where, fmt, value)
                return f"section {index}.sh_{name} {old:#x}->{value:#x}"

            kinds.append(shdr)
    for noff, namesz, descsz, nname in _notes_index(obj):

        def header(noff: int = noff) -> str:
            field = rng.randrange(3)
            value = _interesting(rng, 0, 4, len(data), [0, 4, 5, 8, 12])
            old = _set(data, noff + 4 * field, "I", value)
            return f"note@{noff} header[{field}] {old:#x}->{value:#x}"

        kinds.append(header)

        def desc_byte(noff: int = noff, namesz: int = namesz, descsz: int = descsz) -> str:
            if not descsz:
                return "empty descriptor"
            i = noff + 12 + ((namesz + 3) & ~3) + rng.randrange(descsz)
            old = data[i]
            data[i] = rng.choice([0, 1, 0x2F, 0x3A, 0x5F, 0x7F, 0xFF, old ^ 0x80, 0x41, 200])
            return f"note@{noff} desc byte {i} {old:#x}->{data[i]:#x}"

        kinds += [desc_byte, desc_byte]
        if nname == b"usdt":

            def u64(noff: int = noff, namesz: int = namesz) -> str:
                which = rng.randrange(2)
                at = noff + 12 + ((namesz + 3) & ~3) + 8 * which
                rod = obj.rodata_addr
                value = rng.choice([0, rod - 1, rod, rod + obj.rodata_size - 1,
                                    rod + obj.rodata_size, 1 << 32, (1 << 64) - 1,
                                    rng.getrandbits(64)])  # fmt: skip
                old = _set(data, at, "Q", value)
                return f"usdt@{noff} {'fno' if which else 'off'} {old:#x}->{value:#x}"

            kinds.append(u64)
    return rng.choice(kinds)()


def note_list(rng: random.Random, providers: list[NoteProvider], sites: list[NoteSite],
              e_type: int) -> tuple[BuiltObject, str]:  # fmt: skip
    """Rebuild with the note list changed: a duplicate, a drop, a move, or an unknown note."""
    base = build_object(providers, sites, e_type=e_type)
    index = _notes_index(base)
    raw = []
    for noff, namesz, descsz, _name in index:
        raw.append(base.data[noff : noff + 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)])
    op = rng.choice(["duplicate", "drop", "move", "unknown", "empty-desc", "no-nul-name"])
    i = rng.randrange(len(raw)) if raw else 0
    if op == "duplicate" and raw:
        raw.insert(rng.randrange(len(raw) + 1), raw[i])
    elif op == "drop" and raw:
        del raw[i]
    elif op == "move" and raw:
        raw.insert(rng.randrange(len(raw) + 1), raw.pop(i))
    elif op == "unknown":
        raw.insert(
            rng.randrange(len(raw) + 1), note(rng.choice([b"stap", b"GNU", b"", b"\xff"]), 3, b"x")
        )
    elif op == "empty-desc":
        raw.append(note(b"dver", 1, b""))
    else:
        raw.append(struct.pack("<III", 4, 4, 1) + b"usdt" + b"\0\0\0\0")
    obj = build_object(providers, sites, e_type=e_type, notes=b"".join(raw))
    return obj, f"notes {op} {i}"


def byte_level(rng: random.Random, data: bytearray, other: bytes) -> str:
    op = rng.choice(["flip", "insert", "truncate", "overwrite", "splice", "delete"])
    pos = rng.randrange(len(data) + 1)
    if op == "flip" and data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        return f"flip bit at {i}"
    if op == "insert":
        chunk = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 4, 8, 32])))
        data[pos:pos] = chunk
        return f"insert {len(chunk)} at {pos}"
    if op == "truncate":
        del data[pos:]
        return f"truncate at {pos}"
    if op == "delete":
        n = rng.choice([1, 4, 8, 32])
        del data[pos : pos + n]
        return f"delete {n} at {pos}"
    if op == "overwrite" and data:
        i = rng.randrange(len(data))
        n = min(rng.choice([1, 2, 4, 8]), len(data) - i)
        data[i : i + n] = bytes(rng.choice([0x00, 0xFF, 0x7F, 0x80]) for _ in range(n))
        return f"overwrite {n} at {i}"
    start = rng.randrange(len(other) + 1)
    piece = other[start : start + rng.randrange(1, 256)]
    data[pos : pos + len(piece)] = piece
    return f"splice {len(piece)} bytes of another input at {pos}"


def generate_notes(rng: random.Random, corpus: list[tuple[bytes, bytes]]) -> NotesCase:
    """A fresh valid object (15%), a note-list change (10%), targeted (45%), byte-level (30%)."""
    roll = rng.random()
    helper = random_helper(rng)
    if roll < 0.7 or not corpus:
        providers, sites, e_type = random_object(rng)
        if roll < 0.25 and roll >= 0.15:
            obj, how = note_list(rng, providers, sites, e_type)
        else:
            obj = build_object(providers, sites, e_type=e_type)
            how = "model"
        data = bytearray(obj.data)
        if roll < 0.15:
            return NotesCase(helper, bytes(data), how)
        if roll >= 0.25:
            how += " + " + targeted(rng, obj, data)
            for _ in range(rng.choice([0, 0, 1, 2])):
                how += "; " + targeted(rng, obj, data)
        return NotesCase(helper, bytes(data), how)
    dh, base = rng.choice(corpus)
    data = bytearray(base)
    how = "; ".join(byte_level(rng, data, rng.choice(corpus)[1]) for _ in range(rng.randint(1, 4)))
    return NotesCase(dh if rng.random() < 0.8 else helper, bytes(data), f"corpus + {how}")


def mutate_blocks(
    rng: random.Random, notes: bytes, rodata: bytes, rodata_addr: int, other: bytes
) -> tuple[bytes, bytes, int, str]:
    """A direct ParseNoteBlocks mutation: bytes of either block, or the .rodata address."""
    op = rng.choice(["notes", "notes", "notes", "rodata", "rodata_addr", "swap", "cut-rodata"])
    if op == "notes":
        data = bytearray(notes)
        how = "; ".join(byte_level(rng, data, other) for _ in range(rng.randint(1, 3)))
        return bytes(data), rodata, rodata_addr, f"notes block: {how}"
    if op == "rodata":
        data = bytearray(rodata)
        how = byte_level(rng, data, other)
        return notes, bytes(data), rodata_addr, f"rodata block: {how}"
    if op == "rodata_addr":
        top = (1 << 64) - 1
        addr = rng.choice([0, 1, rodata_addr - 1, rodata_addr + 1, rodata_addr + len(rodata),
                           top, top - len(rodata) + 1, rng.getrandbits(64)]) & top  # fmt: skip
        return notes, rodata, addr, f"rodata_addr {rodata_addr:#x}->{addr:#x}"
    if op == "swap":
        return rodata, notes, rodata_addr, "blocks swapped"
    cut = rng.randrange(len(rodata) + 1)
    return notes, rodata[:cut], rodata_addr, f"rodata block cut at {cut}"


__all__ = ["EHDR", "NotesCase", "generate_notes", "mutate_blocks", "random_object", "targeted"]
