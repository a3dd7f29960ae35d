"""Build DOF the way ``dtrace -G`` lays it out — for tests, the fuzz harness and benchmarks.

The parser's tests need valid DOF to start from and exact offsets to break one
rule at a time; the fuzz harness needs a model to mutate.  This is the encoder
side of :mod:`common.dof_abi`: pure, no I/O.

Layout produced: header, section headers right after it, then each section's
data at its stated alignment.  Section 0 is the shared string table (starting
with an empty string); each provider adds PROBES, PRARGS, PROFFS, [PRENOFFS],
[RELTAB, URELHDR] and PROVIDER, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.dof_abi import (
    DIF_VERSION_2,
    DOF_ENCODE_LSB,
    DOF_HDR,
    DOF_HELPER,
    DOF_MAG_STRING,
    DOF_MODEL_LP64,
    DOF_PROBE,
    DOF_PROVIDER,
    DOF_PROVIDER_V1,
    DOF_RELO_SETX,
    DOF_RELODESC,
    DOF_RELOHDR,
    DOF_SEC,
    DOF_SECF_LOAD,
    DOF_SECT_PRARGS,
    DOF_SECT_PRENOFFS,
    DOF_SECT_PROBES,
    DOF_SECT_PROFFS,
    DOF_SECT_PROVIDER,
    DOF_SECT_RELTAB,
    DOF_SECT_STRTAB,
    DOF_SECT_URELHDR,
)

Name = str | bytes


def _b(name: Name) -> bytes:
    return name.encode("utf-8") if isinstance(name, str) else name


@dataclass
class ProbeSpec:
    func: Name
    name: Name
    offsets: list[int]
    enoffsets: list[int] = field(default_factory=list)
    addr: int = 0x401000  # dofpr_addr as found in memory (after the runtime loader)
    native: list[Name] = field(default_factory=list)
    xlat: list[Name] = field(default_factory=list)
    argmap: list[int] = field(default_factory=list)


@dataclass
class ProviderSpec:
    name: Name
    probes: list[ProbeSpec]
    relocate: bool = False  # one SETX relocation per probe, as dtrace -G emits


@dataclass
class SectionInfo:
    index: int
    type: int
    offset: int
    size: int
    entsize: int
    align: int

    @property
    def header_offset(self) -> int:
        """Where this section's ``dof_sec_t`` lies in the DOF."""
        return DOF_HDR.size + self.index * DOF_SEC.size


@dataclass
class BuiltDof:
    data: bytes
    sections: list[SectionInfo]
    strtab: dict[bytes, int]

    def section(self, sec_type: int, nth: int = 0) -> SectionInfo:
        """The *nth* section of *sec_type*."""
        return [s for s in self.sections if s.type == sec_type][nth]


class _StrTab:
    def __init__(self) -> None:
        self.buf = bytearray(b"\0")
        self.index: dict[bytes, int] = {b"": 0}

    def add(self, s: bytes) -> int:
        if s not in self.index:
            self.index[s] = len(self.buf)
            self.buf += s + b"\0"
        return self.index[s]

    def add_run(self, strings: list[bytes]) -> int:
        """Consecutive strings (argument types are read as a run); offset of the first."""
        if not strings:
            return 0
        first = len(self.buf)
        for s in strings:
            self.buf += s + b"\0"
        return first


def build_dof(
    providers: list[ProviderSpec],
    *,
    version: int | None = None,
    model: int = DOF_MODEL_LP64,
) -> BuiltDof:
    """Encode *providers* as one DOF.  *version* defaults as ``dtrace -G``: 3 with is-enabled."""
    if version is None:
        version = 3 if any(p.enoffsets for pv in providers for p in pv.probes) else 2
    strtab = _StrTab()
    # (type, align, entsize, data) in section order; section 0 is the string table
    sections: list[tuple[int, int, int, bytes]] = [(DOF_SECT_STRTAB, 1, 0, b"")]

    for pv in providers:
        probes = bytearray()
        prargs = bytearray()
        proffs = bytearray()
        prenoffs = bytearray()
        relocs = bytearray()
        for i, p in enumerate(pv.probes):
            func = strtab.add(_b(p.func))
            name = strtab.add(_b(p.name))
            nargv = strtab.add_run([_b(a) for a in p.native])
            xargv = strtab.add_run([_b(a) for a in p.xlat])
            argidx = len(prargs)
            prargs += bytes(p.argmap)
            offidx = len(proffs) // 4
            proffs += b"".join(o.to_bytes(4, "little") for o in p.offsets)
            enoffidx = len(prenoffs) // 4
            prenoffs += b"".join(o.to_bytes(4, "little") for o in p.enoffsets)
            probes += DOF_PROBE.pack(
                p.addr, func, name, nargv, xargv, argidx, offidx,
                len(p.native), len(p.xlat), len(p.offsets),
                enoffidx if p.enoffsets else 0, len(p.enoffsets), 0, 0,
            )  # fmt: skip
            if pv.relocate:
                relocs += DOF_RELODESC.pack(func, DOF_RELO_SETX, i * DOF_PROBE.size, 0)
        base = len(sections)
        sections += [
            (DOF_SECT_PROBES, 8, DOF_PROBE.size, bytes(probes)),
            (DOF_SECT_PRARGS, 1, 1, bytes(prargs)),
            (DOF_SECT_PROFFS, 4, 4, bytes(proffs)),
        ]
        prenoffs_index = 0
        if prenoffs or any(p.enoffsets for p in pv.probes):
            prenoffs_index = len(sections)
            sections.append((DOF_SECT_PRENOFFS, 4, 4, bytes(prenoffs)))
        if pv.relocate:
            reltab_index = len(sections)
            sections.append((DOF_SECT_RELTAB, 8, DOF_RELODESC.size, bytes(relocs)))
            sections.append((DOF_SECT_URELHDR, 4, 0, DOF_RELOHDR.pack(0, reltab_index, base)))
        provname = strtab.add(_b(pv.name))
        fields = (0, base, base + 1, base + 2, provname, 0, 0, 0, 0, 0)
        if version == 1:
            provider = DOF_PROVIDER_V1.pack(*fields)
        else:
            provider = DOF_PROVIDER.pack(*fields, prenoffs_index)
        sections.append((DOF_SECT_PROVIDER, 4, 0, provider))

    sections[0] = (DOF_SECT_STRTAB, 1, 0, bytes(strtab.buf))
    secoff = DOF_HDR.size
    offset = secoff + DOF_SEC.size * len(sections)
    body = bytearray()
    headers = bytearray()
    infos: list[SectionInfo] = []
    for index, (sec_type, align, entsize, data) in enumerate(sections):
        offset += -offset % align
        pad = offset - secoff - DOF_SEC.size * len(sections) - len(body)
        body += bytes(pad) + data
        headers += DOF_SEC.pack(sec_type, align, DOF_SECF_LOAD, entsize, offset, len(data))
        infos.append(SectionInfo(index, sec_type, offset, len(data), entsize, align))
        offset += len(data)
    loadsz = secoff + len(headers) + len(body)
    ident = DOF_MAG_STRING + bytes([model, DOF_ENCODE_LSB, version, DIF_VERSION_2, 8, 8]) + bytes(6)
    header = DOF_HDR.pack(
        ident, 0, DOF_HDR.size, DOF_SEC.size, len(sections), secoff, loadsz, loadsz, 0
    )
    return BuiltDof(header + bytes(headers) + bytes(body), infos, dict(strtab.index))


def build_helper(mod: Name = b"a.out", addr: int = 0, dof: int = 0) -> bytes:
    """An 80-byte ``dof_helper_t``; *mod* is NUL-padded (it may fill all 64 bytes)."""
    raw = _b(mod)
    if len(raw) > 64:
        raise ValueError("dofhp_mod holds at most 64 bytes")
    return DOF_HELPER.pack(raw.ljust(64, b"\0"), addr, dof)


def many_probes_dof(nprobes: int, *, provider: str = "bench", relocate: bool = False) -> BuiltDof:
    """A single-provider DOF with *nprobes* probes, one tracepoint and three arguments each.

    With 2000 probes this is about the size of upstream's ``tst.manyprobes`` (~206 KiB).
    """
    probes = [
        ProbeSpec(
            func=f"test_function_{i:05d}",
            name=f"test_probe_{i:05d}",
            offsets=[0x10],
            addr=0x401000 + 0x40 * i,
            native=["int", "char *", "long"],
        )
        for i in range(nprobes)
    ]
    return build_dof([ProviderSpec(provider, probes, relocate=relocate)])
