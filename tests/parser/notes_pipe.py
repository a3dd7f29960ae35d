"""A minimal driver of the real parser child for the notes exchanges, speaking common.framing.

Not :mod:`dtprobed` (whose host side is being rebuilt): this starts
``python -I -m parserd`` (sandboxed unless told otherwise) on two pipes,
sends requests, answers every ``ReadAt`` of a ``LocateNotes`` from an
in-memory object with one ``ObjectBytes`` frame, and collects the records up
to the end record (``NotesLocation`` or ``Err`` for ``LocateNotes``; ``Eof``
or ``Err`` otherwise).  It checks the protocol's rules on the way: a
``ReadAt`` is the last record of its batch, within the file, and only in a
``LocateNotes`` exchange; nothing else follows the end record.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
from dataclasses import dataclass, field

from common.errors import ProtocolError
from common.framing import MAX_RECORD_FRAME, FrameDecoder, FrameEncoder
from common.limits import ParseLimits
from common.records import Eof, Err, Log, NotesLocation, ParserRecord, ReadAt, ResultRecord
from common.requests import LocateNotes, ObjectBytes, ParseNoteBlocks, ParseRequest


class ChildDied(Exception):
    """The child ended (or broke the protocol); ``returncode`` says how."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(f"{message} (exit status {returncode})")
        self.returncode = returncode


@dataclass
class Answer:
    records: list[ResultRecord]
    reads: list[tuple[int, int]] = field(default_factory=list)
    logs: list[Log] = field(default_factory=list)
    #: both phases (:meth:`NotesPipe.notes`): the LocateNotes answer, if it was a location
    location: NotesLocation | None = None


def limit_args(limits: ParseLimits) -> list[str]:
    return [
        f"--max-dof-size={limits.max_dof_size}",
        f"--max-providers={limits.max_providers}",
        f"--max-probes={limits.max_probes}",
        f"--max-tracepoints={limits.max_tracepoints}",
        f"--max-object-reads={limits.max_object_reads}",
        f"--max-object-bytes={limits.max_object_bytes}",
    ]


class NotesPipe:
    def __init__(
        self, limits: ParseLimits | None = None, *, sandbox: bool = True, timeout: float = 10.0
    ) -> None:
        self.limits = limits or ParseLimits()
        self.timeout = timeout
        args = [sys.executable, "-I", "-m", "parserd", *limit_args(self.limits)]
        if not sandbox:
            args.append("--no-sandbox")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/"
        )
        self._decoder: FrameDecoder[list[ParserRecord]] = FrameDecoder(
            list[ParserRecord], MAX_RECORD_FRAME
        )
        self._encoder = FrameEncoder()
        ready = self._batch()
        if not (len(ready) == 1 and isinstance(ready[0], Log) and "ready" in ready[0].message):
            raise ChildDied(f"unexpected start-up batch {ready!r}", self.proc.poll())
        self.ready = ready[0].message

    def _read_exactly(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        out = bytearray()
        fd = self.proc.stdout.fileno()
        while len(out) < n:
            ready, _, _ = select.select([fd], [], [], self.timeout)
            if not ready:
                raise TimeoutError(f"child silent for {self.timeout} s")
            chunk = self.proc.stdout.read1(n - len(out))  # type: ignore[attr-defined]
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def _batch(self) -> list[ParserRecord]:
        try:
            return self._decoder.read(self._read_exactly)
        except (ProtocolError, EOFError, OSError) as err:
            raise ChildDied(f"no batch: {err!r}", self._reap()) from err
        except Exception as err:  # PeerClosed and friends
            raise ChildDied(f"no batch: {err!r}", self._reap()) from err

    def _reap(self) -> int | None:
        try:
            return self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            return None

    def _send(self, msg: object) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(self._encoder.encode(msg))
            self.proc.stdin.flush()
        except BrokenPipeError as err:
            raise ChildDied("request pipe closed", self._reap()) from err

    def locate_notes(self, helper: bytes, obj: bytes, size: int | None = None) -> Answer:
        """One ``LocateNotes`` exchange: ``records`` is ``[NotesLocation]`` or ``[Err]``."""
        file_size = len(obj) if size is None else size
        self._send(LocateNotes(helper=helper, size=file_size))
        return self._collect(obj, file_size, locate=True)

    def parse_note_blocks(
        self, helper: bytes, notes_addr: int, notes: bytes, rodata_addr: int, rodata: bytes
    ) -> Answer:
        """One ``ParseNoteBlocks`` exchange (a ``ReadAt`` in its answer is a violation)."""
        self._send(
            ParseNoteBlocks(
                helper=helper,
                notes_addr=notes_addr,
                notes=notes,
                rodata_addr=rodata_addr,
                rodata=rodata,
            )
        )
        return self._collect(None, 0)

    def notes(self, helper: bytes, obj: bytes) -> Answer:
        """Both phases, as the host runs them: locate, cut the blocks from *obj*, parse them.

        ``records`` is the LocateNotes ``Err``, or the ParseNoteBlocks stream; ``reads``
        and ``location`` are the LocateNotes'.
        """
        located = self.locate_notes(helper, obj)
        loc = located.records[0]
        if not isinstance(loc, NotesLocation):
            return located
        based = helper[:64] + loc.base.to_bytes(8, "little") + helper[72:]
        notes = obj[loc.notes_offset : loc.notes_offset + loc.notes_size]
        rodata = obj[loc.rodata_offset : loc.rodata_offset + loc.rodata_size]
        parsed = self.parse_note_blocks(based, loc.notes_addr, notes, loc.rodata_addr, rodata)
        return Answer(parsed.records, located.reads, located.logs + parsed.logs, loc)

    def parse_dof(self, helper: bytes, dof: bytes) -> Answer:
        self._send(ParseRequest(helper=helper, dof=dof))
        return self._collect(None, 0)

    def _collect(self, obj: bytes | None, file_size: int, *, locate: bool = False) -> Answer:
        answer = Answer([])
        ends = (NotesLocation, Err) if locate else (Eof, Err)
        while True:
            batch = self._batch()
            for i, rec in enumerate(batch):
                if isinstance(rec, Log):
                    answer.logs.append(rec)
                elif isinstance(rec, ReadAt):
                    if obj is None:
                        raise ChildDied("ReadAt outside a LocateNotes exchange", None)
                    if i != len(batch) - 1:
                        raise ChildDied("ReadAt is not the last record of its batch", None)
                    if rec.offset + rec.size > file_size:
                        raise ChildDied(f"ReadAt past the end of the file: {rec}", None)
                    answer.reads.append((rec.offset, rec.size))
                    self._send(ObjectBytes(data=obj[rec.offset : rec.offset + rec.size]))
                else:
                    answer.records.append(rec)
                    if locate and len(answer.records) == 1 and not isinstance(rec, ends):
                        raise ChildDied(f"LocateNotes answered {rec!r}", None)
                    if isinstance(rec, ends):
                        if i != len(batch) - 1:
                            raise ChildDied("records after the end record", None)
                        return answer

    def send_raw(self, msg: object) -> None:
        self._send(msg)

    def next_batch(self) -> list[ParserRecord]:
        return self._batch()

    def close(self) -> int | None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        code = self._reap()
        if code is None:
            self.proc.kill()
            code = self.proc.wait()
        return code
