"""The daemon's exception family.  Each class says who is at fault.

Only the receiver turns these into a negative errno for a client; anything
that is not a :class:`DtprobedError` reaching it is our own bug (logged with
its traceback, answered with EIO).
"""

from __future__ import annotations

import errno as _errno
import os


class DtprobedError(Exception):
    """Base of every error the daemon raises on purpose."""


class ProtocolError(DtprobedError):
    """A peer sent bytes that break the contract (framing, schema, grammar).

    The peer is at fault; the connection or child that sent them is discarded.
    """

    def __init__(self, what: str, offset: int | None = None) -> None:
        self.what = what
        self.offset = offset
        super().__init__(what if offset is None else f"{what} (at offset {offset})")

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[str, int | None]]:
        return (type(self), (self.what, self.offset))


class PeerClosed(ProtocolError):
    """The peer closed its end cleanly between frames (EOF before a header)."""

    def __init__(self, what: str = "peer closed the pipe", offset: int | None = None) -> None:
        super().__init__(what, offset)


class ChildFailed(DtprobedError):
    """A child process (parser or stash writer) broke: died, hung or misbehaved."""


class ChildTimeout(ChildFailed):
    """A child did not answer within the exchange timeout and was killed."""


class SandboxViolation(ChildFailed):
    """The parser made a syscall its seccomp filter forbids and was killed (SIGSYS)."""


class RequestRejected(DtprobedError):
    """The client's request is invalid; the client gets ``-errno``."""

    def __init__(self, errno: int, reason: str) -> None:
        self.errno = errno
        self.reason = reason
        super().__init__(f"{reason} ({_errno.errorcode.get(errno, errno)})")

    def __reduce__(self) -> tuple[type[RequestRejected], tuple[int, str]]:
        return (type(self), (self.errno, self.reason))


class StashError(DtprobedError):
    """An operation on the on-disk stash failed."""

    def __init__(self, op: str, name: str, errno: int, detail: str | None = None) -> None:
        self.op = op
        self.name = name
        self.errno = errno
        self.detail = detail
        text = detail if detail is not None else os.strerror(errno)
        super().__init__(f"{op} {name}: {text}")

    def __reduce__(self) -> tuple[type[StashError], tuple[str, str, int, str | None]]:
        return (type(self), (self.op, self.name, self.errno, self.detail))


class StashFormatError(DtprobedError):
    """A parsed-DOF stash file does not have the format the consumer requires."""
