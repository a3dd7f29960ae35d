"""Requests the receiver sends to the parser child.

One request is one frame; the child answers it with record batches
(:mod:`common.records`).  A ``ParseRequest`` (DOF) or ``ParseNoteBlocks``
(ELF notes) is answered by a result stream ending in exactly one ``Eof`` or
``Err``; a ``LocateNotes`` by exactly one ``NotesLocation`` or ``Err``.

A notes registration takes two exchanges (``docs/protocol.md``):

1. ``LocateNotes`` (the ELF phase): the child answers with ``ReadAt`` records
   (each the last record of its batch) and the host answers each with exactly
   one ``ObjectBytes`` frame, until the child sends its ``NotesLocation`` (or
   ``Err``).  The child reads only the ELF header, the section header table
   and the section-name table, never the sections' contents.
2. ``ParseNoteBlocks`` (the notes phase): the host reads the two blocks the
   location names (whole ``.note.usdt``, whole ``.rodata``) once, sends them,
   and stores exactly those bytes; the child parses them without any
   ``ReadAt``.  A reparse at start-up sends the stored blocks again.

``ObjectBytes`` is only valid as the answer to a ``ReadAt``; as a request it
is a protocol error.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from common.dof_abi import DOF_HELPER, DOF_MAXSZ
from common.limits import MAX_OBJECT_BYTES, MAX_OBJECT_READ, MAX_OBJECT_SIZE

PARSE_REQUEST_TAG: Final = 1
LOCATE_NOTES_TAG: Final = 2
OBJECT_BYTES_TAG: Final = 3
PARSE_NOTE_BLOCKS_TAG: Final = 4
#: Largest block (``notes`` or ``rodata``) a ParseNoteBlocks may carry: no more than the
#: largest ``max_object_bytes`` (the configured limit bounds the two together, in the child).
MAX_NOTE_BLOCK: Final = MAX_OBJECT_BYTES

__all__ = [
    "LOCATE_NOTES_TAG",
    "MAX_NOTE_BLOCK",
    "MAX_OBJECT_SIZE",
    "OBJECT_BYTES_TAG",
    "PARSE_NOTE_BLOCKS_TAG",
    "PARSE_REQUEST_TAG",
    "Helper",
    "LocateNotes",
    "ObjectBytes",
    "ParseNoteBlocks",
    "ParseRequest",
    "ParserRequest",
    "Request",
]

Helper = Annotated[bytes, msgspec.Meta(min_length=DOF_HELPER.size, max_length=DOF_HELPER.size)]
U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints never exceed 2**64-1
Block = Annotated[bytes, msgspec.Meta(max_length=MAX_NOTE_BLOCK)]


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


class LocateNotes(Request, tag=LOCATE_NOTES_TAG, frozen=True):
    """Find the ``.note.usdt`` and ``.rodata`` of an ELF object the host holds open.

    ``helper`` is the ``dof_helper_t`` the host built (``dofhp_mod`` = basename of
    the object's mapping path, ``dofhp_addr`` = start of the object's first
    mapping in the caller, ``dofhp_dof`` = 0); ``size`` is the file's size from
    ``fstat``.  The child reads the file only through ``ReadAt`` and answers one
    ``NotesLocation`` or one ``Err``.  With ``dof`` (catch-up) it also looks for an
    allocated ``.SUNW_dof`` and accepts an object that has only that.
    """

    helper: Helper
    size: Annotated[int, msgspec.Meta(ge=0, le=MAX_OBJECT_SIZE)]
    dof: bool = False


class ObjectBytes(Request, tag=OBJECT_BYTES_TAG, frozen=True):
    """The host's answer to one ``ReadAt``: the bytes at that offset, shorter only at EOF."""

    data: Annotated[bytes, msgspec.Meta(max_length=MAX_OBJECT_READ)]


class ParseNoteBlocks(Request, tag=PARSE_NOTE_BLOCKS_TAG, frozen=True):
    """Parse the two blocks of a notes object: the result stream, or one ``Err``.

    ``helper``'s ``dofhp_addr`` is already the load base (``NotesLocation.base``;
    at a reparse, the stored ``dof_helper_t``'s): a tracepoint's address is
    ``dofhp_addr + offset``.  ``notes`` is the whole ``.note.usdt`` (its
    ``sh_addr`` is ``notes_addr``), ``rodata`` the whole ``.rodata`` (its
    ``sh_addr`` is ``rodata_addr``; function names are looked up at
    ``addr - rodata_addr``).  The child refuses ``len(notes) + len(rodata) >
    max_object_bytes`` (E2BIG).
    """

    helper: Helper
    notes_addr: U64
    notes: Block
    rodata_addr: U64
    rodata: Block


ParserRequest = ParseRequest | LocateNotes | ObjectBytes | ParseNoteBlocks
