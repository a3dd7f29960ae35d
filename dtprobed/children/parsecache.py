"""Accepted parse results by content, so a fork child's re-registration skips the parser.

drti registers again from a ``pthread_atfork`` child handler: the child sends
its parent's ``dof_helper_t`` and DOF bytes, unchanged (the mapping, its
relocation base and its bytes are inherited).  The parser is a pure function
of the request (helper, bytes) and of its limits, which are fixed for a
:class:`~dtprobed.children.parser.ParserChild`; so the checked record stream
of identical request bytes is the one the child sent before, and is answered
from here.

What a cached result still goes through is unchanged: the receiver checks its
tracepoints against the *caller's* maps and the stash writer re-checks the
stream and commits it for the caller.  Only an accepted parse is kept (a
rejected one costs its sender the parse again, and the penalties apply).

The ELF phase of a notes object (``LocateNotes``) is kept too, by the
request's helper, size and kind, with what the parser read of the object
(offset, size and digest of each ``ReadAt`` answer): a later request is
answered from it only if the same reads of *its* object give the same bytes
(re-read here, a few headers, bounded by ``MAX_REPLAY_BYTES``), since the
parser's answer is a function of the bytes it was given.

A result is served only to another requester (the calling thread id) than
the one whose request stored it: a fork child is a new thread, while a thread
that sends the same request again (a constructor run twice, a retry after a
failure) has it parsed again, as it would have without the cache.

The key is a BLAKE2b-256 digest of the request kind, the
80-byte helper and every byte the parser would read: two requests share an
entry only if they are byte-identical (a collision would need a second
preimage).  Sharing across processes and users reveals nothing the stash
does not show: whether the same bytes were registered before is listed,
world-readable, under the state directory.

Bounded: at most *max_entries* results, *max_records* records and *max_bytes*
(an estimate of the memory they hold, argument strings counted) in all, least
recently used first out; a result larger than a quarter of either budget is
not kept (a huge DOF is rare and would evict everything else, and a small DOF
that decodes into megabytes of argument types — docs/security.md — must not
stay in the daemon's memory).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from common.grammar import ParsedProbe
from common.records import NotesLocation, ResultRecord

#: An accepted parse as kept: the record stream and its probes (ParseResult's fields).
Parsed = tuple[list[ResultRecord], list[ParsedProbe]]

#: Defaults the daemon uses: a forking server's few DOFs, and room for upstream's
#: largest test (2000 probes with 3 arguments: 6002 records, ~1.5 MiB by the estimate
#: below, 1.8 MiB measured) a few times over.  The byte bound is what the daemon's
#: size at rest may grow by, per parser.
DEFAULT_MAX_ENTRIES: Final = 128
DEFAULT_MAX_RECORDS: Final = 1 << 15
DEFAULT_MAX_BYTES: Final = 8 << 20
#: The estimate of a kept result: per record (the struct, its names, its share of the
#: per-probe grouping), and per argument string on top of its bytes.
_RECORD_BYTES: Final = 200
_STR_BYTES: Final = 50
_INT_BYTES: Final = 8

_ADDRS: Final = struct.Struct("<QQQ")
_LOCATE: Final = struct.Struct("<QB")
#: A located object is kept only if the parser read at most this much of it (re-read
#: on every hit): headers and section tables, not sections.
MAX_REPLAY_BYTES: Final = 1 << 20

#: What the parser read of an object: (offset, size, digest of the bytes it got).
Reads = list[tuple[int, int, bytes]]


def read_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def locate_key(helper: bytes, size: int, dof: bool) -> bytes:
    """The key of a LocateNotes request (the object's bytes are checked on a hit)."""
    h = hashlib.blake2b(b"locate\0", digest_size=32)
    h.update(helper)
    h.update(_LOCATE.pack(size, dof))
    return h.digest()


def result_bytes(records: list[ResultRecord]) -> int:
    """About how much memory a kept result holds (argument strings dominate a bomb)."""
    total = len(records) * _RECORD_BYTES
    for rec in records:
        args = getattr(rec, "args", None)
        if args:
            total += sum(len(a) for a in args) + _STR_BYTES * len(args)
        mapping = getattr(rec, "map", None)
        if mapping:
            total += _INT_BYTES * len(mapping)
    return total


def dof_key(helper: bytes, dof: bytes) -> bytes:
    """The key of a ParseRequest (the helper has a fixed size: no separator needed)."""
    h = hashlib.blake2b(b"dof\0", digest_size=32)
    h.update(helper)
    h.update(dof)
    return h.digest()


def notes_key(
    helper: bytes, notes_addr: int, notes: bytes, rodata_addr: int, rodata: bytes
) -> bytes:
    """The key of a ParseNoteBlocks request (sizes included: the block boundary is part of it)."""
    h = hashlib.blake2b(b"notes\0", digest_size=32)
    h.update(helper)
    h.update(_ADDRS.pack(notes_addr, rodata_addr, len(notes)))
    h.update(notes)
    h.update(rodata)
    return h.digest()


class ParseCache:
    """A bounded LRU of accepted parse results; thread-safe."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_entries < 0 or max_records < 0 or max_bytes < 0:
            raise ValueError("cache bounds must not be negative")
        self.max_entries = max_entries
        self.max_records = max_records
        self.max_bytes = max_bytes
        # key -> ((records, probes), requester, estimated bytes)
        self._entries: OrderedDict[bytes, tuple[Parsed, int, int]] = OrderedDict()
        self._records = 0
        self._bytes = 0
        self._locations: OrderedDict[bytes, tuple[Reads, NotesLocation, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def records(self) -> int:
        """Records held in all (what the bound counts)."""
        return self._records

    @property
    def held_bytes(self) -> int:
        """Estimated bytes held in all (:func:`result_bytes` of every result)."""
        return self._bytes

    def get(self, key: bytes, requester: int) -> Parsed | None:
        """(records, probes) stored under *key* by another requester (fresh lists: a
        caller may not alter ours), or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[1] == requester:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        records, probes = found[0]
        return list(records), list(probes)

    def put(
        self,
        key: bytes,
        records: list[ResultRecord],
        probes: list[ParsedProbe],
        requester: int,
    ) -> None:
        size = len(records)
        if self.max_entries == 0 or size > self.max_records // 4:
            return
        nbytes = result_bytes(records)
        if nbytes > self.max_bytes // 4:
            return
        kept = (list(records), list(probes))
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._records -= len(old[0][0])
                self._bytes -= old[2]
            self._entries[key] = (kept, requester, nbytes)
            self._records += size
            self._bytes += nbytes
            while (
                len(self._entries) > self.max_entries
                or self._records > self.max_records
                or self._bytes > self.max_bytes
            ):
                _, (gone, _, gone_bytes) = self._entries.popitem(last=False)
                self._records -= len(gone[0])
                self._bytes -= gone_bytes

    def get_location(
        self, key: bytes, requester: int, read: Callable[[int, int], bytes]
    ) -> NotesLocation | None:
        """The location stored under *key* by another requester, if *read* gives back
        the bytes the parser read then; None otherwise."""
        with self._lock:
            found = self._locations.get(key)
            if found is None or found[2] == requester:
                self.misses += 1
                return None
            self._locations.move_to_end(key)
        reads, location, _ = found
        for offset, size, digest in reads:
            if read_digest(read(offset, size)) != digest:
                with self._lock:
                    self.misses += 1
                return None
        with self._lock:
            self.hits += 1
        return location

    def put_location(
        self, key: bytes, reads: Reads, location: NotesLocation, requester: int
    ) -> None:
        if self.max_entries == 0 or sum(size for _, size, _ in reads) > MAX_REPLAY_BYTES:
            return
        with self._lock:
            self._locations.pop(key, None)
            self._locations[key] = (list(reads), location, requester)
            while len(self._locations) > self.max_entries:
                self._locations.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._locations.clear()
            self._records = 0
            self._bytes = 0


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_RECORDS",
    "MAX_REPLAY_BYTES",
    "ParseCache",
    "Parsed",
    "dof_key",
    "locate_key",
    "notes_key",
    "read_digest",
    "result_bytes",
]
