"""Valid DOF to start from, and exact byte edits that break one rule each.

The parser's rule tests take a DOF built by :mod:`common.dof_build` (laid out
as ``dtrace -G`` does), change one field in place, and parse.  Fields are
named as in :mod:`common.dof_abi`, so a test reads like the rule it breaks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from common.dof_abi import (
    DOF_HDR,
    DOF_PROBE,
    DOF_PROVIDER,
    DOF_RELODESC,
    DOF_RELOHDR,
    DOF_SEC,
    DOF_SECT_PROBES,
    DOF_SECT_PROVIDER,
    DOF_SECT_RELTAB,
    DOF_SECT_URELHDR,
)
from common.dof_build import BuiltDof, ProbeSpec, ProviderSpec, SectionInfo, build_dof, build_helper
from common.layout import Layout

#: Where ``dof_build`` puts the base probe's code (``ProbeSpec.addr``).
BASE_ADDR = 0x401000


def _put(data: bytearray, layout: Layout, base: int, name: str, value: int | bytes) -> None:
    fmt = dict(layout.fields)[name]
    struct.pack_into("<" + fmt, data, base + layout.offset(name), value)


@dataclass
class Dof:
    """A built DOF being edited, with its helper."""

    built: BuiltDof
    data: bytearray = field(init=False)
    helper: bytes = field(default_factory=build_helper)

    def __post_init__(self) -> None:
        self.data = bytearray(self.built.data)

    def __len__(self) -> int:
        return len(self.data)

    def sec(self, sec_type: int, nth: int = 0) -> SectionInfo:
        return self.built.section(sec_type, nth)

    def set_header(self, name: str, value: int | bytes) -> Dof:
        _put(self.data, DOF_HDR, 0, name, value)
        return self

    def set_ident(self, index: int, value: int) -> Dof:
        self.data[index] = value
        return self

    def set_section(self, index: int, name: str, value: int) -> Dof:
        _put(self.data, DOF_SEC, DOF_HDR.size + index * DOF_SEC.size, name, value)
        return self

    def set_provider(self, name: str, value: int, nth: int = 0) -> Dof:
        _put(self.data, DOF_PROVIDER, self.sec(DOF_SECT_PROVIDER, nth).offset, name, value)
        return self

    def set_probe(self, j: int, name: str, value: int, provider: int = 0) -> Dof:
        base = self.sec(DOF_SECT_PROBES, provider).offset + j * DOF_PROBE.size
        _put(self.data, DOF_PROBE, base, name, value)
        return self

    def set_relohdr(self, name: str, value: int) -> Dof:
        _put(self.data, DOF_RELOHDR, self.sec(DOF_SECT_URELHDR).offset, name, value)
        return self

    def set_relocation(self, j: int, name: str, value: int) -> Dof:
        base = self.sec(DOF_SECT_RELTAB).offset + j * DOF_RELODESC.size
        _put(self.data, DOF_RELODESC, base, name, value)
        return self

    def set_bytes(self, offset: int, value: bytes) -> Dof:
        self.data[offset : offset + len(value)] = value
        return self

    def set_helper(self, mod: bytes | str = b"a.out", addr: int = 0) -> Dof:
        self.helper = build_helper(mod, addr)
        return self

    def strtab_offset(self, name: bytes) -> int:
        return self.built.strtab[name]


def base_probe(**changes: object) -> ProbeSpec:
    """Two offsets (given unsorted), two native types, one translated type mapped to arg 1."""
    spec = ProbeSpec(
        func="fn",
        name="pr",
        offsets=[0x20, 0x10],
        native=["int", "char *"],
        xlat=["char *"],
        argmap=[1],
    )
    for key, value in changes.items():
        setattr(spec, key, value)
    return spec


def base_dof(*probes: ProbeSpec, version: int | None = None, relocate: bool = True) -> Dof:
    """One provider ``prov``, relocated as ``dtrace -G`` does.

    Sections with the default single probe, DOF v2: 0 STRTAB, 1 PROBES, 2 PRARGS,
    3 PROFFS, 4 RELTAB, 5 URELHDR, 6 PROVIDER.  With is-enabled offsets (v3)
    PRENOFFS is 4 and the rest move up by one.
    """
    specs = list(probes) or [base_probe()]
    return Dof(build_dof([ProviderSpec("prov", specs, relocate=relocate)], version=version))


def base_v3() -> Dof:
    """The base probe plus one is-enabled offset: DOF v3 with a PRENOFFS section (index 4)."""
    return base_dof(base_probe(enoffsets=[0x8]))


def providers_dof(*names: str, version: int | None = None) -> Dof:
    """One provider per name, each with probes ``f:a`` and ``f:b``."""
    return Dof(
        build_dof(
            [
                ProviderSpec(name, [ProbeSpec("f", "a", [0x4]), ProbeSpec("f", "b", [0x8])])
                for name in names
            ],
            version=version,
        )
    )
