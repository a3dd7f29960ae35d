"""ioctl numbers of the DTrace helper device (``include/dtrace/ioctl.h``), and dispatch.

The device layer dispatches on ``_IOC_TYPE`` and ``_IOC_NR``, not on the whole
command word, so the 32-bit encodings of the commands whose argument is a
C ``int`` or a pointer passed *by value* are accepted too:

=====================  ==================  ==============================  ===========
command                number              argument                        sizes
=====================  ==================  ==============================  ===========
``DTRACEHIOC_REMOVE``  ``_IOW(0xd8, 2)``   the generation, an ``int``,     4, 8
                                           by value
``DTRACEHIOC_ADDDOF``  ``_IOW(0xd8, 3)``   ``dof_helper_t *``              80
``DTRACEHIOC_HASUSDT`` ``_IOW(0xd8, 4)``   an address inside the object,   8, 4 (32-bit
                                           by value (``void *``)           caller)
=====================  ==================  ==============================  ===========

Anything else (other type, other number, direction not ``_IOC_WRITE``, a
size not listed) is not ours: :func:`helper_ioctl_kind` returns ``None``.
"""

from __future__ import annotations

from typing import Final, Literal

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE: Final = 1


def _IOW(type_: int, nr: int, size: int) -> int:
    return (_IOC_WRITE << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (type_ << _IOC_TYPESHIFT) | nr


def _IOC_DIR(cmd: int) -> int:
    return (cmd >> _IOC_DIRSHIFT) & 0x3


def _IOC_TYPE(cmd: int) -> int:
    return (cmd >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)


def _IOC_NR(cmd: int) -> int:
    return (cmd >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


def _IOC_SIZE(cmd: int) -> int:
    return (cmd >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


DTRACEHIOC: Final = 0xD8
DTRACEHIOC_NR_ADD: Final = 1
DTRACEHIOC_NR_REMOVE: Final = 2
DTRACEHIOC_NR_ADDDOF: Final = 3
DTRACEHIOC_NR_HASUSDT: Final = 4

DTRACEHIOC_ADD: Final = _IOW(DTRACEHIOC, 1, 64)  # legacy, dof_hdr_t by pointer; not handled
DTRACEHIOC_REMOVE: Final = _IOW(DTRACEHIOC, 2, 4)  # generation passed *by value*
DTRACEHIOC_ADDDOF: Final = _IOW(DTRACEHIOC, 3, 80)  # dof_helper_t by pointer
DTRACEHIOC_HASUSDT: Final = _IOW(DTRACEHIOC, 4, 8)  # address in the object, *by value* (LP64)
DTRACEHIOC_HASUSDT_32: Final = _IOW(DTRACEHIOC, 4, 4)  # the same from a 32-bit caller

assert DTRACEHIOC_ADD == 0x4040D801
assert DTRACEHIOC_REMOVE == 0x4004D802
assert DTRACEHIOC_ADDDOF == 0x4050D803
assert DTRACEHIOC_HASUSDT == 0x4008D804
assert DTRACEHIOC_HASUSDT_32 == 0x4004D804

HelperIoctl = Literal["adddof", "remove", "hasusdt"]

_KINDS: Final[dict[int, tuple[HelperIoctl, tuple[int, ...]]]] = {
    DTRACEHIOC_NR_REMOVE: ("remove", (4, 8)),
    DTRACEHIOC_NR_ADDDOF: ("adddof", (80,)),
    DTRACEHIOC_NR_HASUSDT: ("hasusdt", (8, 4)),
}


def helper_ioctl_kind(cmd: int) -> HelperIoctl | None:
    """Which helper ioctl *cmd* is (by type, number, direction and size), or None."""
    if _IOC_TYPE(cmd) != DTRACEHIOC or _IOC_DIR(cmd) != _IOC_WRITE or cmd >> 32:
        return None
    entry = _KINDS.get(_IOC_NR(cmd))
    if entry is None or _IOC_SIZE(cmd) not in entry[1]:
        return None
    return entry[0]


def c_int(value: int) -> int:
    """A C ``int`` passed by value in an ioctl argument: the low 32 bits, sign-extended.

    ``REMOVE(-1)`` arrives as ``arg`` 0xffffffff (or, from a caller that
    sign-extended it, 0xffffffffffffffff): both are -1.
    """
    low = value & 0xFFFFFFFF
    return low - (1 << 32) if low & 0x80000000 else low


def by_value_address(arg: int) -> int:
    """The pointer a caller passed by value, as the kernel hands it over.

    Not masked to 32 bits for the 32-bit command: a 32-bit caller's pointer
    is zero-extended by the kernel (``compat_ptr``) and so already fits, and a
    64-bit caller that uses the 32-bit number still passes a 64-bit pointer.
    """
    return arg & 0xFFFFFFFFFFFFFFFF
