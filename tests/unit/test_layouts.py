"""Binary layouts and ioctl numbers agree with the C headers."""

from __future__ import annotations

from common import dof_abi, ioctl
from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper


def test_sizes_and_offsets() -> None:
    assert dof_abi.DOF_HDR.size == 64
    assert dof_abi.DOF_SEC.size == 32
    assert dof_abi.DOF_PROVIDER_V1.size == 40
    assert dof_abi.DOF_PROVIDER.size == 44
    assert dof_abi.DOF_PROBE.size == 48
    assert dof_abi.DOF_PROBE.offset("nargc") == 32
    assert dof_abi.DOF_PROBE.offset("enoffidx") == 36
    assert dof_abi.DOF_RELODESC.size == 24
    assert dof_abi.DOF_HELPER.size == 80
    assert dof_abi.DOF_HELPER.offset("dof") == 72


def test_ioctl_numbers() -> None:
    assert ioctl.DTRACEHIOC_ADDDOF == 0x4050D803
    assert ioctl.DTRACEHIOC_REMOVE == 0x4004D802


def test_builder_header_is_self_consistent() -> None:
    built = build_dof([ProviderSpec("prov", [ProbeSpec("f", "p", [1], enoffsets=[2])])])
    hdr = dof_abi.DOF_HDR.unpack_from(built.data)
    assert hdr.ident[:4] == b"\x7fDOF" and hdr.ident[6] == 3  # is-enabled implies v3
    assert hdr.loadsz == len(built.data)
    assert hdr.secnum == len(built.sections)
    for sec in built.sections:
        raw = dof_abi.DOF_SEC.unpack_from(built.data, sec.header_offset)
        assert (raw.type, raw.offset, raw.size) == (sec.type, sec.offset, sec.size)
        assert raw.offset % max(raw.align, 1) == 0


def test_helper() -> None:
    h = build_helper(b"x" * 64, addr=1, dof=2)
    assert len(h) == 80 and h[64:72] == (1).to_bytes(8, "little")
