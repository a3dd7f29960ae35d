"""Requests the receiver sends to the parser child.

One request is one frame; the child answers it with record batches
(:mod:`common.records`) ending in exactly one ``Eof`` or ``Err``.

``ParseNotes`` starts an exchange: the child answers with ``ReadAt`` records
(each the last record of its batch) and the host answers each with exactly
one ``ObjectBytes`` frame, until the child ends the stream.  ``ObjectBytes``
is only valid as such an answer; as a request it is a protocol error.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from common.dof_abi import DOF_HELPER, DOF_MAXSZ
from common.limits import MAX_OBJECT_READ

PARSE_REQUEST_TAG: Final = 1
PARSE_NOTES_TAG: Final = 2
OBJECT_BYTES_TAG: Final = 3
#: Largest object file size a ParseNotes may state (u63: what ``fstat`` can report).
MAX_OBJECT_SIZE: Final = (1 << 63) - 1

Helper = Annotated[bytes, msgspec.Meta(min_length=DOF_HELPER.size, max_length=DOF_HELPER.size)]


class Request(
    msgspec.Struct,
    array_like=True,
    frozen=True,
    forbid_unknown_fields=True,
    tag_field="kind",
):
    """Base of the parser's requests; on the wire the tag is item 0."""


class ParseRequest(Request, tag=PARSE_REQUEST_TAG, frozen=True):
    """Parse one DOF.

    ``helper`` is the caller's 80-byte ``dof_helper_t`` as received; ``dof`` is
    exactly the ``dofh_loadsz`` bytes the receiver fetched (the first-read size).
    """

    helper: Helper
    dof: Annotated[bytes, msgspec.Meta(max_length=DOF_MAXSZ)]


class ParseNotes(Request, tag=PARSE_NOTES_TAG, frozen=True):
    """Parse the ``.note.usdt`` of an ELF object the host holds open.

    ``helper`` is the ``dof_helper_t`` the host built (``dofhp_mod`` = basename of
    the object's mapping path, ``dofhp_addr`` = start of the object's first
    mapping in the caller, ``dofhp_dof`` = 0); ``size`` is the file's size from
    ``fstat``.  The child reads the file only through ``ReadAt``.
    """

    helper: Helper
    size: Annotated[int, msgspec.Meta(ge=0, le=MAX_OBJECT_SIZE)]


class ObjectBytes(Request, tag=OBJECT_BYTES_TAG, frozen=True):
    """The host's answer to one ``ReadAt``: the bytes at that offset, shorter only at EOF."""

    data: Annotated[bytes, msgspec.Meta(max_length=MAX_OBJECT_READ)]


ParserRequest = ParseRequest | ParseNotes | ObjectBytes
