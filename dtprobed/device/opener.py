"""The helper device: what the FUSE-file and CUSE modes share, and how to open one.

Interface for the receiver
--------------------------
::

    dev = open_device("auto" | "cuse" | "fuse", "/dev/dtrace/helper", handler,
                      max_dof_size=..., log=logger)
    # dev.mode is "fuse" or "cuse", dev.path the helper path
    sel.register(dev.fileno(), EVENT_READ)       # or: dev.run(stop_event)
    ... when readable: while dev.serve_once(): pass
    dev.close()                                  # unmounts / removes the device

``handler(request, reply)`` is called from ``serve_once`` (the thread that
serves the device) with a complete :class:`HelperRequest`: the device layer has
already fetched the 80-byte ``dof_helper_t`` and exactly ``dofh_loadsz`` bytes
of DOF from the caller.  ``reply(result)`` answers the client's ``ioctl``:
``result >= 0`` is the ioctl's return value (the generation), ``-errno`` makes
it fail with that errno.  ``reply`` may be called later and from any thread
(each reply is one ``write`` to the device, which the kernel takes whole); only
the first call counts, later ones are logged and ignored.  A handler that
raises :class:`common.errors.RequestRejected` answers ``-errno``; any other
exception is our bug: logged with its traceback, answered ``-EIO``.

Requests the device layer refuses without calling the handler (each logged
at WARNING with the thread id and the reason), all answered EINVAL as
upstream answers every ADDDOF error: a helper of the wrong size, a DOF header
that cannot be read or whose ``dofh_loadsz`` is below 64 or above
``max_dof_size``, DOF memory that cannot be read (EFAULT from
``process_vm_readv``), a CUSE retry answered with the wrong sizes, an unknown
ioctl command (dispatch is on ``_IOC_TYPE``/``_IOC_NR``; ADDDOF, REMOVE and
HASUSDT are ours), a CUSE header whose DOF would exceed the bound on
partly fetched DOF.  REMOVE and HASUSDT reach the handler with their
by-value argument decoded (``gen`` a C ``int``, ``address``); a handler
that does not know a kind answers it ``-EINVAL``.  A ``dofh_loadsz`` above the limit is EINVAL, not E2BIG: the
client library (drti) only reports failure, and upstream's own limit check
answers EINVAL too.

Errors at set-up (:class:`DeviceError` and subclasses) are fatal for the
daemon: the CLI maps them to exit status 1.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Literal, Protocol

from dtprobed.device.cuse import (
    CUSE_PATH,
    DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_PENDING_PER_UID,
    STALE_SEQUENCE_S,
    CuseDevice,
    devname_for,
)
from dtprobed.device.errors import DeviceBusy, DeviceError
from dtprobed.device.fusefile import FuseFileDevice
from dtprobed.device.ratelog import RateLog
from dtprobed.device.request import Handler

DeviceMode = Literal["auto", "cuse", "fuse"]


class HelperDevice(Protocol):
    """What :func:`open_device` returns; see the module docstring."""

    @property
    def mode(self) -> Literal["cuse", "fuse"]: ...
    @property
    def path(self) -> str: ...
    def fileno(self) -> int: ...
    def serve_once(self) -> bool: ...
    def run(self, stop: threading.Event, *, poll_interval: float = ...) -> None: ...
    def close(self) -> None: ...

    #: Refusals are logged through it, per uid (the daemon shares the receiver's).
    ratelog: RateLog


def open_device(
    mode: DeviceMode,
    path: str,
    handler: Handler,
    *,
    max_dof_size: int,
    log: logging.Logger | None = None,
    host_ns_pid: int = 1,
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    max_pending_per_uid: int = DEFAULT_MAX_PENDING_PER_UID,
    sequence_expiry: float = STALE_SEQUENCE_S,
) -> HelperDevice:
    """Set up and return the helper device at *path* (absolute).

    ``cuse``: a character device via ``/dev/cuse``; *path* must be under
    ``/dev`` (the device name is the rest).  ``fuse``: a one-file FUSE
    filesystem mounted on *path*, in the mount namespace of *host_ns_pid*
    (see :mod:`dtprobed.device.mount`).  ``auto``: CUSE when *path* is under ``/dev``
    and ``/dev/cuse`` opens and accepts CUSE_INIT, otherwise FUSE.
    Raises :class:`DeviceError` (fatal) when the chosen mode cannot be set up.

    CUSE only: *max_pending_bytes* bounds the DOF held by partly fetched
    ioctl-retry sequences, *sequence_expiry* (seconds) drops abandoned ones
    (see :mod:`dtprobed.device.cuse`).  FUSE mode fetches the DOF in one go
    and holds nothing between requests.
    """

    log = log or logging.getLogger("dtprobed.device")
    if not os.path.isabs(path):
        raise DeviceError(f"helper path {path!r} is not absolute")
    path = os.path.normpath(path)

    def cuse() -> HelperDevice:
        return CuseDevice.open(
            path,
            handler,
            max_dof_size=max_dof_size,
            log=log,
            max_pending_bytes=max_pending_bytes,
            max_pending_per_uid=max_pending_per_uid,
            sequence_expiry=sequence_expiry,
        )

    if mode == "cuse":
        return cuse()
    if mode == "auto" and devname_for(path) is not None and os.path.exists(CUSE_PATH):
        try:
            return cuse()
        except DeviceBusy:
            raise
        except DeviceError as err:
            log.info("CUSE unavailable (%s); using a FUSE file", err)
    elif mode not in ("auto", "fuse"):
        raise DeviceError(f"unknown device mode {mode!r}")
    return FuseFileDevice.open(
        path, handler, max_dof_size=max_dof_size, log=log, host_ns_pid=host_ns_pid
    )
