"""Resource limits on one DOF, applied by the parser (and re-checked by the host).

Upstream has none beyond the 256 MiB size cap; a hostile DOF of 10^6 probes
would otherwise tie up the parser and fill the stash.  The defaults admit a
20000-probe DOF with room to spare; all are settable with ``dtprobed``
options and reach the parser child on its command line, before it locks itself.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

from common.dof_abi import DOF_MAXSZ

DEFAULT_MAX_DOF_SIZE: Final = DOF_MAXSZ
DEFAULT_MAX_PROVIDERS: Final = 256
DEFAULT_MAX_PROBES: Final = 65536
DEFAULT_MAX_TRACEPOINTS: Final = 262144
#: ELF-notes objects.  ``max_object_reads``: how many ``ReadAt`` one ``LocateNotes`` may
#: make; ``max_object_bytes``: how many bytes they may fetch in all, and also how large the
#: two blocks together may be (``notes_size + rodata_size`` in ``LocateNotes``,
#: ``len(notes) + len(rodata)`` in ``ParseNoteBlocks``).  A ``.note.usdt`` of a 20000-probe
#: object is about 2 MiB, a ``.rodata`` a few KiB to a few MiB, the headers a few KiB:
#: 64 reads of at most :data:`MAX_OBJECT_READ` (1 MiB) each and 64 MiB admit that with a
#: wide margin and keep a hostile object from making the daemon read a huge file.
DEFAULT_MAX_OBJECT_READS: Final = 64
DEFAULT_MAX_OBJECT_BYTES: Final = 64 << 20
#: Largest single ``ReadAt``: as large as a record batch frame (``MAX_RECORD_FRAME``), so
#: the ``ObjectBytes`` answer frame has the same kind of small, fixed bound, and one read
#: covers the notes of a typical object.
MAX_OBJECT_READ: Final = 1 << 20
#: Upper bound of ``max_object_bytes`` (an option can raise it this far, no further): the two
#: blocks of a ``ParseNoteBlocks`` travel in one request frame, whose bound is
#: ``DOF_MAXSZ + 4096`` (:data:`common.framing.MAX_REQUEST_FRAME`); the helper and the
#: msgpack overhead take well under 4096 bytes.
MAX_OBJECT_BYTES: Final = DOF_MAXSZ
#: Largest object file size a ``LocateNotes`` may state, and largest file offset a
#: ``NotesLocation`` may give (u63: what ``fstat`` can report).
MAX_OBJECT_SIZE: Final = (1 << 63) - 1

Positive = Annotated[int, msgspec.Meta(ge=1)]


class ParseLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-DOF limits; exceeding one is an ``E2BIG`` error naming the limit."""

    max_dof_size: Annotated[int, msgspec.Meta(ge=64, le=DOF_MAXSZ)] = DEFAULT_MAX_DOF_SIZE
    max_providers: Positive = DEFAULT_MAX_PROVIDERS
    max_probes: Positive = DEFAULT_MAX_PROBES
    max_tracepoints: Positive = DEFAULT_MAX_TRACEPOINTS
    max_object_reads: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] = DEFAULT_MAX_OBJECT_READS
    max_object_bytes: Annotated[int, msgspec.Meta(ge=4096, le=MAX_OBJECT_BYTES)] = (
        DEFAULT_MAX_OBJECT_BYTES
    )


# --- fairness between callers (per uid; docs/security.md, "Fairness") -----------------
#: FUSE-file mode: a fetch of a caller's DOF that brings nothing for this long (seconds)
#: is abandoned (its helper process counted as stuck against the caller's uid).
DEFAULT_FETCH_TIMEOUT: Final = 5.0
#: Stuck fetch helpers one uid may have before its ADDDOF are refused at once.
DEFAULT_MAX_STUCK_FETCHES_PER_UID: Final = 2
#: Back-off of a sender (uid) whose request made a child time out or crash, or whose
#: fetch was abandoned: refused at once for FIRST s, doubling per repeat, at most MAX s;
#: a uid clean for 2 × MAX s starts again at FIRST.
DEFAULT_PENALTY_FIRST: Final = 1.0
DEFAULT_PENALTY_MAX: Final = 60.0
#: Log lines per uid: a bucket of BURST lines, refilled at RATE lines per second.
DEFAULT_LOG_BURST: Final = 200
DEFAULT_LOG_RATE: Final = 20.0
#: DOF bytes queued or in flight in the large lane: in all, and per uid (≥ the largest
#: DOF, so every uid can always have one in flight).
DEFAULT_MAX_QUEUED_BYTES: Final = 1 << 30
DEFAULT_MAX_QUEUED_BYTES_PER_UID: Final = 512 << 20
#: The small lane's own budget (DOF < 64 KiB each): never shared with large DOF.
DEFAULT_SMALL_QUEUED_BYTES: Final = 64 << 20
DEFAULT_SMALL_QUEUED_BYTES_PER_UID: Final = 16 << 20
#: Requests one uid may have queued (not yet started) per lane.
DEFAULT_MAX_QUEUED_PER_UID: Final = 4096
#: Parser seconds (decaying, half-life 2 s) above which a uid's requests leave the
#: small lane for the large one until its usage decays.
DEFAULT_HEAVY_PARSE_SECONDS: Final = 0.5
