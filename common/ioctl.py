"""ioctl numbers of the DTrace helper device (``include/dtrace/ioctl.h``)."""

from __future__ import annotations

from typing import Final

_IOC_WRITE: Final = 1


def _IOW(type_: int, nr: int, size: int) -> int:
    return (_IOC_WRITE << 30) | (size << 16) | (type_ << 8) | nr


DTRACEHIOC: Final = 0xD8
DTRACEHIOC_ADD: Final = _IOW(DTRACEHIOC, 1, 64)  # legacy, dof_hdr_t by pointer; not handled
DTRACEHIOC_REMOVE: Final = _IOW(DTRACEHIOC, 2, 4)  # generation passed *by value*
DTRACEHIOC_ADDDOF: Final = _IOW(DTRACEHIOC, 3, 80)  # dof_helper_t by pointer

assert DTRACEHIOC_ADD == 0x4040D801
assert DTRACEHIOC_REMOVE == 0x4004D802
assert DTRACEHIOC_ADDDOF == 0x4050D803
