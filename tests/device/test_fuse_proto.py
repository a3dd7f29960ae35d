"""The codec refuses messages that break the kernel's promises."""

from __future__ import annotations

import pytest

from common import fuse_abi as abi
from common.errors import ProtocolError
from dtprobed.device import fuse_proto as proto


def header(size: int, opcode: int, extlen: int = 0) -> bytes:
    return abi.FUSE_IN_HEADER.pack(size, opcode, 2, 1, 0, 0, 123, extlen, 0)


def ioctl(in_size: int, data: bytes) -> bytes:
    body = abi.FUSE_IOCTL_IN.pack(0, 0, 0x4050D803, 0, in_size, 0) + data
    return header(40 + len(body), abi.FUSE_IOCTL) + body


@pytest.mark.parametrize(
    "msg",
    [
        b"\0" * 39,  # shorter than the header
        header(41, abi.FUSE_STATFS),  # len says more than was read
        header(40 + 8, abi.FUSE_GETATTR) + bytes(8),  # fuse_getattr_in is 16 bytes
        ioctl(81, bytes(80)),  # in_size disagrees with the data
        header(40, abi.FUSE_STATFS, extlen=1),  # extensions larger than the message
    ],
)
def test_malformed_requests(msg: bytes) -> None:
    with pytest.raises(ProtocolError):
        proto.decode_request(msg)


def test_extensions_are_split_off() -> None:
    msg = header(48, abi.FUSE_STATFS, extlen=1) + bytes(8)
    assert proto.decode_request(msg).payload == b""


def test_short_init_of_older_kernels_reads_as_zero() -> None:
    msg = header(56, abi.FUSE_INIT) + abi.FUSE_INIT_IN.pack(7, 31, 4096, 1, 9)[:16]
    args = proto.decode_request(msg).args
    assert (args.major, args.minor, args.flags, args.flags2) == (7, 31, 1, 0)


@pytest.mark.parametrize("bad", [0, -1, 512])
def test_error_range(bad: int) -> None:
    with pytest.raises(ValueError):
        proto.encode_error(1, bad)


def test_ioctl_result_must_be_non_negative() -> None:
    with pytest.raises(ValueError):
        proto.encode_ioctl(1, -1)


def test_opcode_names_come_from_the_constants() -> None:
    assert abi.OPCODE_NAMES[abi.FUSE_IOCTL] == "FUSE_IOCTL"
    assert abi.OPCODE_NAMES[abi.CUSE_INIT] == "CUSE_INIT"
    assert abi.FUSE_FLUSH in abi.OPCODE_NAMES and abi.FUSE_INIT_EXT not in abi.OPCODE_NAMES
