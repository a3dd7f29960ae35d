"""Host side of the stash writer child: :class:`StashWriterChild`.

The daemon never writes under the state directory itself; it sends one
command at a time to the writer child (:mod:`dtprobed.stash_writer`) and
waits, bounded by *timeout*, for the one reply.  A child that dies, hangs or
answers out of protocol is killed and reaped and :class:`ChildFailed` (or
:class:`ChildTimeout`) is raised; the next call starts a new child, which
recovers the tree first.  A ``Failure`` reply raises :class:`StashError`
with the writer's errno.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from common.errors import ChildFailed, ChildTimeout, ProtocolError, StashError
from common.framing import HEADER_SIZE, FrameDecoder, FrameEncoder
from common.grammar import ParsedProbe
from common.records import Eof, ResultRecord
from common.stash_protocol import (
    MAX_REPLY_FRAME,
    Command,
    Done,
    Failure,
    Generation,
    Items,
    Pids,
    Problems,
    PruneDead,
    Register,
    Registration,
    Remove,
    RemovePid,
    ReparseItem,
    ReparseScan,
    StashQuotas,
    StashReply,
    Verify,
    WriteReparsed,
)
from dtprobed.parser_client import classify_exit


def probes_to_records(probes: Sequence[ParsedProbe]) -> list[ResultRecord]:
    """The record stream for grouped probes: each PROVIDER, then its ``nprobes`` probes.

    The writer re-checks the stream, so probes that do not add up to their
    provider's ``nprobes`` are refused there, not papered over here.
    """
    out: list[ResultRecord] = []
    remaining = 0
    for p in probes:
        if remaining <= 0:
            out.append(p.provider)
            remaining = p.provider.nprobes
        out.append(p.probe)
        out.extend(p.args)
        out.extend(p.tracepoints)
        remaining -= 1
    out.append(Eof())
    return out


class StashWriterChild:
    """One writer child; thread-safe (one command at a time)."""

    def __init__(
        self,
        state_dir: str,
        *,
        timeout: float,
        quotas: StashQuotas | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.timeout = timeout
        self.quotas = quotas if quotas is not None else StashQuotas()
        self.log = log if log is not None else logging.getLogger("dtprobed.stash_client")
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._encoder = FrameEncoder()
        self._decoder: FrameDecoder[StashReply] = FrameDecoder(StashReply, MAX_REPLY_FRAME)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        old = self._proc
        if old is not None:
            status = old.poll()
            if status is None:
                return
            # It died between commands: no command failed, so this one goes to a new
            # writer; say so, and release the dead one's pipes.
            _, phrase = classify_exit(status, killed_by_us=False)
            self.log.error("stash writer %d died between commands; it %s", old.pid, phrase)
            self._proc = None
            for stream in (old.stdin, old.stdout):
                if stream is not None:
                    stream.close()
        q = self.quotas
        # -I and cwd "/": no PYTHON* variables, nothing from the daemon's directory
        # on sys.path (the parser child is started the same way)
        cmd = [
            sys.executable,
            "-I",
            "-m",
            "dtprobed.stash_writer",
            "--state-dir",
            os.path.abspath(self.state_dir),
            f"--max-generations={q.max_generations}",
            f"--max-probes-per-pid={q.max_probes_per_pid}",
            f"--max-probes-total={q.max_probes_total}",
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, cwd="/"
        )

    def stop(self) -> None:
        with self._lock:
            self._stop(kill=False)

    def _stop(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        if kill:
            proc.kill()
        else:
            proc.stdin.close()  # EOF between frames: the writer exits cleanly
        try:
            proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()

    # --------------------------------------------------------------- exchange

    def _exchange(self, command: Command) -> StashReply:
        with self._lock:
            self._start()
            proc = self._proc
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            frame = self._encoder.encode(command)
            deadline = time.monotonic() + self.timeout
            try:
                self._send(proc, frame, deadline)
                return self._receive(proc, deadline)
            except ChildTimeout:
                self._stop(kill=True)
                raise
            except (ProtocolError, OSError) as err:
                status = proc.poll()
                self._stop(kill=True)
                raise ChildFailed(f"stash writer failed (status {status}): {err}") from err

    def _send(self, proc: subprocess.Popen[bytes], frame: bytes, deadline: float) -> None:
        assert proc.stdin is not None
        fd = proc.stdin.fileno()
        view = memoryview(frame)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_WRITE)
            while view:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    raise ChildTimeout(f"stash writer did not take a command in {self.timeout} s")
                view = view[os.write(fd, view[: 1 << 16]) :]

    def _receive(self, proc: subprocess.Popen[bytes], deadline: float) -> StashReply:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()

        def read_exactly(n: int) -> bytes:
            chunks: list[bytes] = []
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                while n > 0:
                    if not sel.select(max(0.0, deadline - time.monotonic())):
                        raise ChildTimeout(f"stash writer did not answer in {self.timeout} s")
                    chunk = os.read(fd, min(n, 1 << 20))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    n -= len(chunk)
            return b"".join(chunks)

        header = read_exactly(HEADER_SIZE)
        if len(header) != HEADER_SIZE:
            raise ProtocolError("stash writer closed its pipe")
        body = read_exactly(self._decoder.check_length(header))
        return self._decoder.decode_body(body)

    def _call(self, command: Command, expected: type) -> StashReply:
        reply = self._exchange(command)
        if isinstance(reply, Failure):
            raise StashError(type(command).__name__, "stash", reply.errno, reply.message)
        if not isinstance(reply, expected):
            with self._lock:
                self._stop(kill=True)
            raise ChildFailed(
                f"stash writer answered {type(reply).__name__} to {type(command).__name__}"
            )
        return reply

    # --------------------------------------------------------------- operations

    def register(self, reg: Registration, probes: list[ParsedProbe]) -> int:
        reply = self._call(Register(reg=reg, records=probes_to_records(probes)), Generation)
        assert isinstance(reply, Generation)
        return reply.gen

    def remove(self, pid: int, gen: int) -> None:
        self._call(Remove(pid=pid, gen=gen), Done)

    def remove_pid(self, pid: int) -> None:
        self._call(RemovePid(pid=pid), Done)

    def prune_dead(self) -> list[int]:
        reply = self._call(PruneDead(), Pids)
        assert isinstance(reply, Pids)
        return list(reply.pids)

    def reparse_scan(self, force: bool) -> list[ReparseItem]:
        items: list[ReparseItem] = []
        offset: int | None = 0
        while offset is not None:
            reply = self._call(ReparseScan(force=force, offset=offset), Items)
            assert isinstance(reply, Items)
            items.extend(reply.items)
            if reply.next_offset is not None and reply.next_offset <= offset:
                raise ChildFailed("stash writer's reparse scan did not advance")
            offset = reply.next_offset
        return items

    def write_reparsed(self, item: ReparseItem, probes: list[ParsedProbe] | None) -> None:
        records = None if probes is None else probes_to_records(probes)
        self._call(WriteReparsed(item=item, records=records), Done)

    def verify(self) -> list[str]:
        reply = self._call(Verify(), Problems)
        assert isinstance(reply, Problems)
        return list(reply.problems)


__all__ = ["StashWriterChild", "probes_to_records"]
