"""Real third-party DOF: libusdt (npm ``dtrace-provider`` 0.8.8), checked by hand.

The expected records come from the fixture's README (provider ``feasprov``,
module ``feasmod``, ``func1:start(char *, int)``, ``func1:done(int, int,
char *)``, ``func2:event(json)``, DOF v2 so the is-enabled offsets are
dropped).  libusdt writes each probe's native types again as its translated
types, with the identity argmap.

The tracepoint addresses are computed here from the raw bytes, without the
parser or ``common.dof_abi``: walk the 32-byte section headers from
``dofh_secoff`` (u64 at byte 32) for ``dofh_secnum`` (u32 at byte 28)
entries; take the PROBES (type 16) and PROFFS (type 18) sections; for probe
*j* read ``dofpr_addr`` (u64 at +0 of its 48-byte entry), ``dofpr_offidx``
(u32 at +28) and ``dofpr_noffs`` (u16 at +34), then the u32 offsets at
PROFFS + 4 × offidx.  There is no relocation section and every ``dofpr_addr``
is above ``dofhp_addr``, so address = ``dofpr_addr`` + offset.  The result is
also compared with the literal addresses (``xxd`` of the file: 0x…d3000,
0x…d2000, 0x…d1000, each offset 0x10).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from common.grammar import check_stream
from common.records import ArgsMap, ArgsNative, ArgsXlat, Eof, Probe, Provider, Tracepoint
from parserd.dof_parse import parse_dof

FIXTURES = Path(__file__).parent / "fixtures"
DOF = (FIXTURES / "libusdt-3probes.dof").read_bytes()
HELPER = (FIXTURES / "libusdt-3probes.dh").read_bytes()


def _u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


def addresses_from_bytes(data: bytes) -> list[list[int]]:
    """Per probe, ``dofpr_addr + offset`` for each regular offset (see module docstring)."""
    secoff, secnum = _u(data, 32, 8), _u(data, 28, 4)
    sections = {}
    for i in range(secnum):
        header = secoff + 32 * i
        sections[_u(data, header, 4)] = (_u(data, header + 16, 8), _u(data, header + 24, 8))
    probes_off, probes_size = sections[16]
    proffs_off, _ = sections[18]
    result = []
    for entry in range(probes_off, probes_off + probes_size, 48):
        addr, offidx, noffs = _u(data, entry, 8), _u(data, entry + 28, 4), _u(data, entry + 34, 2)
        offsets = [_u(data, proffs_off + 4 * (offidx + k), 4) for k in range(noffs)]
        result.append([addr + off for off in offsets])
    return result


def test_fixture_files_are_the_shared_ones() -> None:
    assert len(DOF) == 556 and len(HELPER) == 80
    assert hashlib.sha256(DOF).hexdigest() == (
        "d322e67cabc6002358fc59ccf451194c2ed611d5ad4a67280f95d4d14a516907"
    )
    assert hashlib.sha256(HELPER).hexdigest() == (
        "f93f988c3d87592b404df4f26f9c1ccd08a81ded8b00f6936bf49c00ee36755a"
    )


def test_helper_as_readme_says() -> None:
    assert HELPER[:8] == b"feasmod\0"
    assert _u(HELPER, 64, 8) == _u(HELPER, 72, 8) == 0x563C43881000  # dofhp_addr == dofhp_dof
    assert DOF[6] == 2  # DOF version 2


def test_addresses_from_bytes() -> None:
    assert addresses_from_bytes(DOF) == [[0x7F8FDD4D3010], [0x7F8FDD4D2010], [0x7F8FDD4D1010]]


def test_records() -> None:
    start, done, event = (
        Tracepoint(addr=a[0], is_enabled=False) for a in addresses_from_bytes(DOF)
    )
    records = parse_dof(HELPER, DOF)
    assert records == [
        Provider(name="feasprov", nprobes=3),
        Probe(mod="feasmod", fun="func1", prb="start", ntp=1, nargc=2, xargc=2),
        ArgsNative(args=["char *", "int"]),
        ArgsXlat(args=["char *", "int"]),
        ArgsMap(map=[0, 1]),
        start,
        Probe(mod="feasmod", fun="func1", prb="done", ntp=1, nargc=3, xargc=3),
        ArgsNative(args=["int", "int", "char *"]),
        ArgsXlat(args=["int", "int", "char *"]),
        ArgsMap(map=[0, 1, 2]),
        done,
        Probe(mod="feasmod", fun="func2", prb="event", ntp=1, nargc=1, xargc=1),
        ArgsNative(args=["json"]),
        ArgsXlat(args=["json"]),
        ArgsMap(map=[0]),
        event,
        Eof(),
    ]
    assert [p.spec for p in check_stream(records).probes] == [
        "feasprov:feasmod:func1:start",
        "feasprov:feasmod:func1:done",
        "feasprov:feasmod:func2:event",
    ]
