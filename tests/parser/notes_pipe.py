"""A minimal driver of the real parser child for ParseNotes, speaking common.framing directly.

Not :mod:`dtprobed` (whose host side is being rebuilt): this starts
``python -I -m parserd`` (sandboxed unless told otherwise) on two pipes,
sends requests, answers every ``ReadAt`` from an in-memory object with one
``ObjectBytes`` frame, and collects the records up to ``Eof``/``Err``.  It
checks the protocol's rules on the way: a ``ReadAt`` is the last record of
its batch and within the file, nothing else follows the end record.
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
from common.records import Eof, Err, Log, ParserRecord, ReadAt, ResultRecord
from common.requests import ObjectBytes, ParseNotes, ParseRequest


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

    def parse_notes(self, helper: bytes, obj: bytes, size: int | None = None) -> Answer:
        file_size = len(obj) if size is None else size
        self._send(ParseNotes(helper=helper, size=file_size))
        return self._collect(obj, file_size)

    def parse_dof(self, helper: bytes, dof: bytes) -> Answer:
        self._send(ParseRequest(helper=helper, dof=dof))
        return self._collect(b"", 0)

    def _collect(self, obj: bytes, file_size: int) -> Answer:
        answer = Answer([])
        while True:
            batch = self._batch()
            for i, rec in enumerate(batch):
                if isinstance(rec, Log):
                    answer.logs.append(rec)
                elif isinstance(rec, ReadAt):
                    if i != len(batch) - 1:
                        raise ChildDied("ReadAt is not the last record of its batch", None)
                    if rec.offset + rec.size > file_size:
                        raise ChildDied(f"ReadAt past the end of the file: {rec}", None)
                    answer.reads.append((rec.offset, rec.size))
                    self._send(ObjectBytes(data=obj[rec.offset : rec.offset + rec.size]))
                else:
                    answer.records.append(rec)
                    if isinstance(rec, Eof | Err):
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
