"""Errors of the helper device's set-up and service.

Set-up errors are fatal for the daemon (the CLI maps :class:`DeviceError` to
exit status 1); :class:`DeviceGone` ends a running service.
"""

from __future__ import annotations

from common.errors import DtprobedError


class DeviceError(DtprobedError):
    """The helper device cannot be set up (fatal: bad path, no /dev/fuse, mount refused)."""


class DeviceBusy(DeviceError):
    """The helper path is already served by a live daemon (or another device is there)."""


class DeviceGone(DeviceError):
    """The kernel ended the connection while we served it (unmounted, aborted)."""
