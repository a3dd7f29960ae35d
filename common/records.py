"""Records the parser child sends for one request: a closed, bounded tagged union.

Every record is a frozen, ``array_like`` msgspec Struct whose first array item
is an integer tag.  Tags are upstream's ``DIT_*`` numbers (``dof_parsed_info``)
so a record and its C form in the stash share one number; ``Log`` (which has
no C form) uses 100.  Tags are never reused; new fields are appended with
defaults (msgspec's schema-evolution rules).

Schema bounds here are absolute (what any record may carry).  Names are
checked against the shared name policy in ``__post_init__``, so a record
that decodes is a record the stash may use: a hostile or broken parser cannot
smuggle ``../x`` past the host.

The stream grammar for one request (checked by :mod:`common.grammar`):

    ParseRequest, ParseNoteBlocks:
        ( PROVIDER ( PROBE [ARGS_NATIVE [ARGS_XLAT ARGS_MAP]] TRACEPOINT{ntp} ){nprobes} )* EOF
      | ERR
    LocateNotes:
        NOTES_LOCATION | ERR

``Log`` records may appear anywhere before the end and are not part of it;
neither may ``ReadAt`` (``LocateNotes`` asking the host for file bytes),
which is always the last record of its batch.  ``NotesLocation`` has no C
form: the host reads the two blocks it names, and stores its ``base`` as the
``dofhp_addr`` of the registration's ``dof_helper_t``.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from common.dof_abi import DOF_MAXSZ
from common.limits import MAX_OBJECT_BYTES, MAX_OBJECT_READ, MAX_OBJECT_SIZE
from common.names import (
    MAX_ARGTYPE_BYTES,
    MAX_NAME_BYTES,
    MAX_SARGS_BYTES,
    NameRefused,
    check_argtype,
    check_name,
    check_sargs,
)

DIT_PROVIDER: Final = 0
DIT_PROBE: Final = 1
DIT_TRACEPOINT: Final = 2
DIT_ERR: Final = 3
DIT_EOF: Final = 4
DIT_ARGS_NATIVE: Final = 5
DIT_ARGS_XLAT: Final = 6
DIT_ARGS_MAP: Final = 7
LOG_TAG: Final = 100
READ_AT_TAG: Final = 101
NOTES_LOCATION_TAG: Final = 102

#: Hard caps on counts a record may carry, whatever the configured limits.
MAX_NPROBES: Final = 1 << 24
MAX_NTP: Final = 2 * 0xFFFF  # noffs and nenoffs are u16 each
MAX_ARGS: Final = 255  # nargc and xargc are u8
MAX_MESSAGE: Final = 1024  # characters in an ERR or LOG message

U8 = Annotated[int, msgspec.Meta(ge=0, le=255)]
U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack ints never exceed 2**64-1
# Code-point bounds are only a cheap first cut; byte limits are checked in __post_init__.
ShortStr = Annotated[str, msgspec.Meta(max_length=255)]
Message = Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE)]
ArgTypes = Annotated[list[ShortStr], msgspec.Meta(min_length=1, max_length=MAX_ARGS)]


class Record(
    msgspec.Struct,
    array_like=True,
    frozen=True,
    forbid_unknown_fields=True,
    tag_field="kind",
    gc=False,
):
    """Base of every record the parser sends; on the wire the tag is item 0."""


_MOD_MAX: Final = MAX_NAME_BYTES["module"]
_FUN_MAX: Final = MAX_NAME_BYTES["function"]
_PRB_MAX: Final = MAX_NAME_BYTES["probe"]
_DOTS: Final = (".", "..")


def _refuse(err: NameRefused) -> ValueError:
    # msgspec turns a ValueError from __post_init__ into a ValidationError with a path.
    return ValueError(str(err))


class Provider(Record, tag=DIT_PROVIDER, frozen=True):
    name: ShortStr
    nprobes: Annotated[int, msgspec.Meta(ge=0, le=MAX_NPROBES)]

    def __post_init__(self) -> None:
        try:
            check_name("provider", self.name)
        except NameRefused as err:
            raise _refuse(err) from None


class Probe(Record, tag=DIT_PROBE, frozen=True):
    mod: ShortStr
    fun: ShortStr
    prb: ShortStr
    ntp: Annotated[int, msgspec.Meta(ge=1, le=MAX_NTP)]
    nargc: U8
    xargc: U8

    def __post_init__(self) -> None:
        mod, fun, prb = self.mod, self.fun, self.prb
        joined = mod + fun + prb
        # check_name's fast path for the three names at once (every probe of every
        # registration decodes here, twice); anything else takes check_name itself
        if not (
            joined.isascii()
            and joined.isprintable()
            and "/" not in joined
            and ":" not in joined
            and 0 < len(mod) <= _MOD_MAX
            and 0 < len(fun) <= _FUN_MAX
            and 0 < len(prb) <= _PRB_MAX
            and mod not in _DOTS
            and fun not in _DOTS
            and prb not in _DOTS
        ):
            try:
                check_name("module", mod)
                check_name("function", fun)
                check_name("probe", prb)
            except NameRefused as err:
                raise _refuse(err) from None
        if self.xargc and not self.nargc:
            raise ValueError("translated arguments without native arguments")


class Tracepoint(Record, tag=DIT_TRACEPOINT, frozen=True):
    """A probe site.  ``args`` is None for DOF; the source-argument string for ELF notes."""

    addr: U64
    is_enabled: bool
    # code points bound the bytes from below only; check_sargs counts bytes
    args: Annotated[str, msgspec.Meta(max_length=MAX_SARGS_BYTES)] | None = None

    def __post_init__(self) -> None:
        if self.args is not None:
            try:
                check_sargs(self.args)
            except NameRefused as err:
                raise _refuse(err) from None


class Err(Record, tag=DIT_ERR, frozen=True):
    errno: Annotated[int, msgspec.Meta(ge=1, le=4095)]
    message: Message


class Eof(Record, tag=DIT_EOF, frozen=True):
    pass


class _ArgTypes(Record, frozen=True):
    args: ArgTypes

    def __post_init__(self) -> None:
        try:
            for arg in self.args:
                if not (arg.isascii() and arg.isprintable() and 0 < len(arg) <= MAX_ARGTYPE_BYTES):
                    check_argtype(arg)  # check_argtype's fast path, inline: 3 types a probe
        except NameRefused as err:
            raise _refuse(err) from None


class ArgsNative(_ArgTypes, tag=DIT_ARGS_NATIVE, frozen=True):
    pass


class ArgsXlat(_ArgTypes, tag=DIT_ARGS_XLAT, frozen=True):
    pass


class ArgsMap(Record, tag=DIT_ARGS_MAP, frozen=True):
    map: Annotated[list[U8], msgspec.Meta(min_length=1, max_length=MAX_ARGS)]


class Log(Record, tag=LOG_TAG, frozen=True):
    """A log line from the parser child, which never logs by itself."""

    level: Annotated[int, msgspec.Meta(ge=0, le=50)]  # logging.DEBUG .. logging.CRITICAL
    message: Message


class ReadAt(Record, tag=READ_AT_TAG, frozen=True):
    """Parser → host: send the object's bytes ``[offset, offset + size)`` as one ``ObjectBytes``.

    Always the last record of its batch frame; the child then blocks until the
    answer arrives.  Not part of the result stream.
    """

    offset: U64
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_OBJECT_READ)]


FileOffset = Annotated[int, msgspec.Meta(ge=0, le=MAX_OBJECT_SIZE)]
BlockSize = Annotated[int, msgspec.Meta(ge=0, le=MAX_OBJECT_BYTES)]


class NotesLocation(Record, tag=NOTES_LOCATION_TAG, frozen=True):
    """The answer to an accepted ``LocateNotes``: where the two blocks lie, and the load base.

    ``base`` is ``dofhp_addr`` for ET_DYN, 0 for ET_EXEC (as upstream); the host
    stores it as the ``dofhp_addr`` of the registration's ``dof_helper_t`` and
    sends it in the ``ParseNoteBlocks`` helper.  ``*_addr`` are the sections'
    ``sh_addr``, ``*_offset`` / ``*_size`` their place in the file (the parser
    checked them against the file size it was told; the host, which knows the
    size, checks again).  The two sizes together are at most
    :data:`~common.limits.MAX_OBJECT_BYTES` (the configured ``max_object_bytes``
    is the parser's to apply).

    Catch-up asks for ``.SUNW_dof`` too (``LocateNotes.dof``): ``dof_addr`` /
    ``dof_size`` are that allocated section's ``sh_addr`` and size (0: none),
    whose bytes the host reads from the process's memory at ``base + dof_addr``
    (ET_DYN) or ``dof_addr`` (ET_EXEC); ``notes_found`` is false when the object
    has ``.SUNW_dof`` but no ``.note.usdt`` (the notes fields are then 0).
    """

    base: U64
    notes_addr: U64
    notes_offset: FileOffset
    notes_size: BlockSize
    rodata_addr: U64
    rodata_offset: FileOffset
    rodata_size: BlockSize
    dof_addr: U64 = 0
    dof_size: Annotated[int, msgspec.Meta(ge=0, le=DOF_MAXSZ)] = 0
    notes_found: bool = True

    def __post_init__(self) -> None:
        if self.notes_offset + self.notes_size > MAX_OBJECT_SIZE:
            raise ValueError("notes block extends past the largest file size")
        if self.rodata_offset + self.rodata_size > MAX_OBJECT_SIZE:
            raise ValueError("rodata block extends past the largest file size")
        if self.notes_size + self.rodata_size > MAX_OBJECT_BYTES:
            raise ValueError(f"blocks of {self.notes_size + self.rodata_size} bytes in all")
        if not self.notes_found and not self.dof_size:
            raise ValueError("neither .note.usdt nor .SUNW_dof located")


ParserRecord = (
    Provider
    | Probe
    | ArgsNative
    | ArgsXlat
    | ArgsMap
    | Tracepoint
    | Err
    | Eof
    | Log
    | ReadAt
    | NotesLocation
)
#: The records that make up an answer (everything but ``Log`` and ``ReadAt``).
ResultRecord = (
    Provider | Probe | ArgsNative | ArgsXlat | ArgsMap | Tracepoint | Err | Eof | NotesLocation
)
