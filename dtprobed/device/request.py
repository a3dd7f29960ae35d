"""One client request as the device layer hands it to the receiver, and its reply.

``Reply(result)`` answers the client's ``ioctl``: ``result >= 0`` is the
ioctl's return value (the generation), ``-errno`` makes it fail with that errno.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable
from dataclasses import dataclass

from common.dof_abi import DOF_HDR, DOF_HELPER
from common.errors import RequestRejected
from common.ioctl import HelperIoctl


@dataclass(frozen=True)
class HelperRequest:
    """One complete client request, as the receiver sees it.

    ``tid`` is the calling thread (``fuse_in_header.pid``; convert it to the
    process with ``/proc``).  ADDDOF: ``helper`` is the 80-byte
    ``dof_helper_t``, ``dof`` exactly ``dofh_loadsz`` bytes whose first 64 are
    the header whose ``loadsz`` was checked, ``gen`` is -1.  REMOVE: ``helper``
    and ``dof`` are empty and ``gen`` is the generation the client passed,
    decoded as the C ``int`` it is (so ``REMOVE(-1)`` is -1, never 0xffffffff;
    it may be negative: the handler must bound it before it goes anywhere).
    HASUSDT: ``helper`` and ``dof`` are empty, ``gen`` is -1 and ``address``
    is the address the client passed *by value* (a function inside the object
    whose ``.note.usdt`` it registers).  ``address`` is 0 for the other kinds.

    A handler that does not know a kind must answer it ``-EINVAL`` (the
    device layer adds kinds as the upstream ABI grows).

    ``remote`` (FUSE-file mode): the DOF has *not* been fetched — ``dof`` is
    empty and the DOF is still in the caller at ``dofhp_dof``.  The device
    thread never touches client memory (a page of it may sit on a file system
    whose READ never completes, and a thread stuck in that page fault cannot
    be cancelled or killed): the handler fetches it off the device loop with
    :class:`dtprobed.device.fetch.FetchPool`.  In CUSE mode the kernel copied
    the DOF in the client's own context and ``remote`` is False.

    ``uid`` is the caller's fsuid as the kernel reports it in
    ``fuse_in_header`` (the fourth ``Uid:`` field of ``/proc/TID/status``,
    read at no cost on the device thread); fairness is accounted per uid.
    -1 when unknown (tests).
    """

    tid: int
    kind: HelperIoctl
    helper: bytes
    dof: bytes
    gen: int
    address: int = 0
    uid: int = -1
    remote: bool = False


Reply = Callable[[int], None]
Handler = Callable[[HelperRequest, Reply], None]


def check_dof_header(header: bytes, max_dof_size: int) -> int:
    """``dofh_loadsz`` of a 64-byte DOF header, bounded before anything is allocated."""
    if len(header) != DOF_HDR.size:
        raise RequestRejected(_errno.EINVAL, f"DOF header of {len(header)} bytes")
    loadsz = int(DOF_HDR.unpack_from(header).loadsz)
    if loadsz < DOF_HDR.size:
        raise RequestRejected(_errno.EINVAL, f"dofh_loadsz {loadsz} smaller than its header")
    if loadsz > max_dof_size:
        raise RequestRejected(_errno.EINVAL, f"dofh_loadsz {loadsz} exceeds limit {max_dof_size}")
    return loadsz


def helper_dof_address(helper: bytes) -> int:
    """``dofhp_dof`` of an 80-byte ``dof_helper_t``."""
    return int(DOF_HELPER.unpack_from(helper).dof)
