"""Requests the receiver sends to the parser child.

One request is one frame; the child answers it with record batches
(:mod:`common.records`) ending in exactly one ``Eof`` or ``Err``.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from common.dof_abi import DOF_HELPER, DOF_MAXSZ

PARSE_REQUEST_TAG: Final = 1


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

    helper: Annotated[bytes, msgspec.Meta(min_length=DOF_HELPER.size, max_length=DOF_HELPER.size)]
    dof: Annotated[bytes, msgspec.Meta(max_length=DOF_MAXSZ)]


ParserRequest = ParseRequest
