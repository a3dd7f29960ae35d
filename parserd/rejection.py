"""How both parsers give up: the first failed rule becomes the request's one ERR record.

A rule raises :class:`Rejected` through :func:`reject`; the parser's entry
point catches it and answers ``[Err(errno, clamp(message))]``.  Nothing else
may escape a parser (its contract: no input makes it raise).
"""

from __future__ import annotations

from errno import EINVAL
from typing import Final, NoReturn

from common.records import MAX_MESSAGE

ELLIPSIS: Final = "..."


class Rejected(Exception):
    """A rule failed; carries the ERR record's errno and message."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(errno, message)
        self.errno = errno
        self.message = message


def reject(message: str, errno: int = EINVAL) -> NoReturn:
    raise Rejected(errno, message)


def clamp(message: str) -> str:
    """Bound a message to what an ERR record may carry."""
    if len(message) <= MAX_MESSAGE:
        return message
    return message[: MAX_MESSAGE - len(ELLIPSIS)] + ELLIPSIS
