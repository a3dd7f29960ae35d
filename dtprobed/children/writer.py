"""Host side of the stash writer child: :class:`StashWriterChild`.

The daemon never writes under the state directory itself; it sends one
command at a time to the writer child (:mod:`dtprobed.stash.writer`) and
waits, bounded by *timeout*, for the one reply.  A child that dies, hangs or
answers out of protocol is killed and reaped and :class:`ChildFailed` (or
:class:`ChildTimeout`) is raised; the next call starts a new child, which
recovers the tree first.  A ``Failure`` reply raises :class:`StashError`
with the writer's errno.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence

from common.errors import ChildFailed, ProtocolError, StashError
from common.framing import FrameDecoder, FrameEncoder
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
from dtprobed.children.process import ChildSlot, RunningChild


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
        self._lock = threading.Lock()
        self._slot = ChildSlot("stash writer", self.argv, self.log)
        self._encoder = FrameEncoder()
        self._decoder: FrameDecoder[StashReply] = FrameDecoder(StashReply, MAX_REPLY_FRAME)

    @property
    def pid(self) -> int | None:
        return self._slot.pid

    def argv(self) -> list[str]:
        q = self.quotas
        return [
            sys.executable,
            "-I",
            "-m",
            "dtprobed.stash.writer",
            "--state-dir",
            os.path.abspath(self.state_dir),
            f"--max-generations={q.max_generations}",
            f"--max-probes-per-pid={q.max_probes_per_pid}",
            f"--max-probes-total={q.max_probes_total}",
        ]

    def start(self) -> None:
        with self._lock:
            self._ready_child()

    def stop(self) -> None:
        with self._lock:
            self._slot.stop("stopping")

    def _ready_child(self) -> RunningChild:
        """The live writer; one that died between commands is reported and replaced.

        No command was in flight, so none fails: the next one goes to a new writer.
        """
        child = self._slot.child
        if child is not None:
            idle = self._slot.read_idle(child)
            if idle == b"":
                self._slot.failed(child, "died between commands", kill=False)
                child = None
            elif idle is not None:
                self._slot.failed(child, "sent bytes between commands", kill=True)
                child = None
        return child if child is not None else self._slot.start()

    # --------------------------------------------------------------- exchange

    def _exchange(self, command: Command) -> StashReply:
        with self._lock:
            child = self._ready_child()
            frame = self._encoder.encode(command)
            deadline = time.monotonic() + self.timeout
            self._slot.send(child, memoryview(frame), deadline, self.timeout)
            pending = bytearray()
            while True:
                pending += self._slot.receive_some(child, deadline, self.timeout)
                try:
                    replies, used = self._decoder.split(pending)
                    if replies and (len(replies) > 1 or used != len(pending)):
                        raise ProtocolError("more than one reply to one command")
                except ProtocolError as err:
                    raise self._slot.failed(child, f"broke the protocol: {err}", kill=True) from err
                if replies:
                    self._slot.succeeded(child)
                    return replies[0]

    def _call(self, command: Command, expected: type) -> StashReply:
        reply = self._exchange(command)
        if isinstance(reply, Failure):
            raise StashError(type(command).__name__, "stash", reply.errno, reply.message)
        if not isinstance(reply, expected):
            with self._lock:
                child = self._slot.child
                if child is not None:
                    self._slot.failed(child, "answered out of protocol", kill=True)
            raise ChildFailed(
                f"stash writer answered {type(reply).__name__} to {type(command).__name__}"
            )
        return reply

    # --------------------------------------------------------------- operations

    def register(self, reg: Registration, probes: list[ParsedProbe]) -> int:
        return self.register_records(reg, probes_to_records(probes))

    def register_records(self, reg: Registration, records: list[ResultRecord]) -> int:
        """Register the record stream the parser sent (``… EOF``) as it is."""
        reply = self._call(Register(reg=reg, records=records), Generation)
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
