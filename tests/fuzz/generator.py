"""Fuzz inputs for the parser: valid DOF from a random model, then targeted or byte-level mutation.

Structure-aware: :func:`random_model` draws providers, probes, arguments,
is-enabled offsets and relocations and :func:`common.dof_build.build_dof`
encodes them; :func:`targeted` then changes one field that a validation rule
of reference §2.5 reads — an ident byte, a header field, a field of one
section header, of a provider, of a probe, a string-table byte, a relocation
entry, an offset or argmap entry — to a value chosen to sit on a boundary.
:func:`byte_level` flips, inserts, truncates, overwrites and splices bytes
(and half the time repairs ``dofh_loadsz`` so the mutation reaches past the
double-fetch check).  Every draw comes from one ``random.Random``: a seed
reproduces a run exactly.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

from common.dof_abi import (
    DOF_HDR,
    DOF_HELPER,
    DOF_PROBE,
    DOF_PROVIDER,
    DOF_PROVIDER_V1,
    DOF_RELODESC,
    DOF_RELOHDR,
    DOF_SEC,
    DOF_SECT_PRARGS,
    DOF_SECT_PRENOFFS,
    DOF_SECT_PROBES,
    DOF_SECT_PROFFS,
    DOF_SECT_PROVIDER,
    DOF_SECT_RELTAB,
    DOF_SECT_STRTAB,
    DOF_SECT_URELHDR,
)
from common.dof_build import BuiltDof, ProbeSpec, ProviderSpec, build_dof, build_helper
from common.layout import Layout

_NAMES = ["p", "probe", "tick", "a-b", "x" * 63, "x" * 64, "ünï", ".", "..", "a/b", "a:b", "",
          "\x01ctl", "f" * 127, "f" * 128]  # fmt: skip
_TYPES = ["int", "char *", "long", "struct foo *", "t" * 127, "t" * 128, "uint64_t", "\x7f"]
_MODULES = [b"a.out", b"libfoo.so.1", b"m" * 63, b"m" * 64, b"", b"..", b"a/b", b"\xff\xfe"]


@dataclass
class Case:
    """One fuzz input and how it was made (printed with a finding)."""

    helper: bytes
    dof: bytes
    how: str


def _pick_name(rng: random.Random, sane: float = 0.9) -> str:
    if rng.random() < sane:
        return rng.choice(["p", "probe", "tick", "fn", "main", "do_work"]) + str(rng.randrange(50))
    return rng.choice(_NAMES)


def random_model(rng: random.Random) -> tuple[list[ProviderSpec], int | None]:
    """Providers and probes with random shapes; returns (providers, DOF version or None)."""
    providers = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        probes = []
        for _ in range(rng.randint(1, 6)):
            nargc = rng.choice([0, 0, 1, 2, 3, 5])
            native = [rng.choice(_TYPES[:4]) for _ in range(nargc)]
            xargc = rng.choice([0, 0, 1, nargc]) if nargc else 0
            xlat = [rng.choice(_TYPES[:4]) for _ in range(xargc)]
            argmap = [rng.randrange(nargc) for _ in range(xargc)]
            offsets = rng.sample(range(0, 0x400, 4), rng.choice([1, 1, 2, 3]))
            enoffsets = rng.sample(range(0, 0x400, 4), rng.choice([0, 0, 1, 2]))
            probes.append(
                ProbeSpec(
                    func=_pick_name(rng),
                    name=_pick_name(rng),
                    offsets=offsets,
                    enoffsets=enoffsets,
                    addr=rng.choice([0x401000, 0x1000, 0, 0x7F0000001000]),
                    native=native,
                    xlat=xlat,
                    argmap=argmap,
                )
            )
        providers.append(ProviderSpec(_pick_name(rng), probes, relocate=rng.random() < 0.4))
    version = rng.choice([None, None, 1, 2, 3])
    return providers, version


def random_helper(rng: random.Random) -> bytes:
    mod = rng.choice(_MODULES[:3]) if rng.random() < 0.95 else rng.choice(_MODULES)
    if mod and len(mod) == 64:
        return DOF_HELPER.pack(mod, 0, 0)  # no NUL within the 64 bytes
    addr = rng.choice([0, 0x400000, 0x7F0000000000, 0xFFFFFFFFFFFFF000, 0x401000])
    return build_helper(mod, addr, rng.choice([0, addr]))


def _interesting(rng: random.Random, current: int, size: int, dof_len: int) -> int:
    top = (1 << (8 * size)) - 1
    choices = [0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 33, 40, 44, 48, 63, 64, 0x7F, 0x80, 0xFF,
               top, top - 1, top >> 1, (top >> 1) + 1, current + 1, current - 1, current * 2,
               current + 8, dof_len, dof_len - 1, dof_len + 1, 0xFFFF, 0x10000, 0x40000000,
               0x80000000, 1 << 32, rng.getrandbits(8 * size)]  # fmt: skip
    return rng.choice(choices) & top


_FMT_SIZE = {"B": 1, "H": 2, "I": 4, "Q": 8}


def _set_field(data: bytearray, base: int, layout: Layout, name: str, rng: random.Random) -> str:
    fmt = dict(layout.fields)[name]
    off = base + layout.offset(name)
    size = _FMT_SIZE[fmt[-1]]
    if off + size > len(data):
        return f"{layout.cname}.{name} out of data"
    (current,) = struct.unpack_from("<" + fmt, data, off)
    value = _interesting(rng, current, size, len(data))
    struct.pack_into("<" + fmt, data, off, value)
    return f"{layout.cname}@{base}.{name} {current:#x}->{value:#x}"


def _sections_of(built: BuiltDof, sec_type: int) -> list[int]:
    return [s.offset for s in built.sections if s.type == sec_type]


def targeted(rng: random.Random, built: BuiltDof, data: bytearray) -> str:
    """Change one field a validation rule reads; returns a description."""
    version = data[6]
    provider_layout = DOF_PROVIDER_V1 if version == 1 else DOF_PROVIDER
    kinds: list[Callable[[], str]] = []

    def ident() -> str:
        i = rng.randrange(16)
        old = data[i]
        data[i] = rng.choice([0, 1, 2, 3, 4, 8, 9, 0x7F, 0xFF, old ^ 1])
        return f"ident[{i}] {old:#x}->{data[i]:#x}"

    kinds.append(ident)
    for name in ("flags", "hdrsize", "secsize", "secnum", "secoff", "loadsz", "filesz"):
        kinds.append(lambda name=name: _set_field(data, 0, DOF_HDR, name, rng))
    for sec in built.sections:
        for name, _ in DOF_SEC.fields:
            kinds.append(lambda s=sec, n=name: _set_field(data, s.header_offset, DOF_SEC, n, rng))
    for off in _sections_of(built, DOF_SECT_PROVIDER):
        for name, _ in provider_layout.fields:
            kinds.append(lambda o=off, n=name: _set_field(data, o, provider_layout, n, rng))
    for sec in (s for s in built.sections if s.type == DOF_SECT_PROBES):
        for i in range(sec.size // DOF_PROBE.size):
            for name, _ in DOF_PROBE.fields:
                base = sec.offset + i * DOF_PROBE.size
                kinds.append(lambda b=base, n=name: _set_field(data, b, DOF_PROBE, n, rng))
    for off in _sections_of(built, DOF_SECT_URELHDR):
        for name, _ in DOF_RELOHDR.fields:
            kinds.append(lambda o=off, n=name: _set_field(data, o, DOF_RELOHDR, n, rng))
    for sec in (s for s in built.sections if s.type == DOF_SECT_RELTAB):
        for i in range(sec.size // DOF_RELODESC.size):
            for name, _ in DOF_RELODESC.fields:
                base = sec.offset + i * DOF_RELODESC.size
                kinds.append(lambda b=base, n=name: _set_field(data, b, DOF_RELODESC, n, rng))
    for sec_type in (DOF_SECT_STRTAB, DOF_SECT_PROFFS, DOF_SECT_PRENOFFS, DOF_SECT_PRARGS):
        for sec in (s for s in built.sections if s.type == sec_type and s.size):

            def entry(s=sec) -> str:  # type: ignore[no-untyped-def]
                i = s.offset + rng.randrange(s.size)
                old = data[i]
                data[i] = rng.choice([0, 1, 0x2F, 0x3A, 0x7F, 0xFF, old ^ 0x80, 0x41])
                return f"section type {s.type} byte {i} {old:#x}->{data[i]:#x}"

            kinds.append(entry)
    return rng.choice(kinds)()


def byte_level(rng: random.Random, data: bytearray, other: bytes) -> str:
    """Flip, insert, truncate, overwrite or splice; sometimes repair loadsz afterwards."""
    op = rng.choice(["flip", "insert", "truncate", "overwrite", "splice", "delete"])
    pos = rng.randrange(len(data) + 1)
    if op == "flip" and data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        what = f"flip bit at {i}"
    elif op == "insert":
        chunk = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 4, 8, 32])))
        data[pos:pos] = chunk
        what = f"insert {len(chunk)} at {pos}"
    elif op == "truncate":
        del data[pos:]
        what = f"truncate at {pos}"
    elif op == "delete":
        n = rng.choice([1, 4, 8, 32])
        del data[pos : pos + n]
        what = f"delete {n} at {pos}"
    elif op == "overwrite" and data:
        i = rng.randrange(len(data))
        n = min(rng.choice([1, 2, 4, 8]), len(data) - i)
        data[i : i + n] = bytes(rng.choice([0x00, 0xFF, 0x7F, 0x80]) for _ in range(n))
        what = f"overwrite {n} at {i}"
    else:
        start = rng.randrange(len(other) + 1)
        piece = other[start : start + rng.randrange(1, 256)]
        data[pos : pos + len(piece)] = piece
        what = f"splice {len(piece)} bytes of another input at {pos}"
    if rng.random() < 0.5 and len(data) >= DOF_HDR.size:
        struct.pack_into("<Q", data, DOF_HDR.offset("loadsz"), len(data))
        what += ", loadsz repaired"
    return what


def generate(rng: random.Random, corpus: list[tuple[bytes, bytes]]) -> Case:
    """One input: a fresh valid DOF (20%), a targeted mutant (50%), or a byte-level one (30%)."""
    roll = rng.random()
    if roll < 0.7 or not corpus:
        providers, version = random_model(rng)
        built = build_dof(providers, version=version)
        helper = random_helper(rng)
        data = bytearray(built.data)
        if roll < 0.2:
            return Case(helper, bytes(data), f"model v{data[6]}")
        how = targeted(rng, built, data)
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            how += "; " + targeted(rng, built, data)
        return Case(helper, bytes(data), f"model v{data[6]} + {how}")
    helper, base = rng.choice(corpus)
    data = bytearray(base)
    how = "; ".join(byte_level(rng, data, rng.choice(corpus)[1]) for _ in range(rng.randint(1, 4)))
    return Case(helper, bytes(data), f"corpus + {how}")
