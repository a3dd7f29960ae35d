"""The record-stream grammar, enforced with a state table.

Both the receiver (checking what the parser child sends) and the stash writer
(checking what the receiver forwards) run every record of a request through a
:class:`StreamChecker`.  A record that is not allowed in the current state
rejects the whole request: the sender is treated as broken or compromised.

    stream   := ERR | provider* EOF
    provider := PROVIDER probe{nprobes}
    probe    := PROBE [ARGS_NATIVE [ARGS_XLAT ARGS_MAP]] TRACEPOINT{ntp}

plus the cross-record rules: argument counts match ``nargc``/``xargc``, every
argmap entry is below ``nargc``, no ``prv:mod:fun:prb`` appears twice, and the
tracepoints of a probe follow the rule of the stream's kind:

* DOF streams (``notes=False``, the answer to a ``ParseRequest``): regular
  tracepoints come first and each class is strictly ascending (as the DOF
  parser emits them);
* ELF-notes streams (``notes=True``, the answer to a ``ParseNoteBlocks``):
  no two tracepoints of a probe share an address, in any order (the parser
  emits upstream's order: first validated, then the others in reverse, so
  that parsed stash files are byte-identical to upstream's).

The answer to a ``LocateNotes`` (one ``NotesLocation`` or ``Err``) is no
stream: :func:`check_location` checks it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

from common.errors import ProtocolError
from common.names import NAME_MAX, printable, probespec
from common.records import (
    ArgsMap,
    ArgsNative,
    ArgsXlat,
    Eof,
    Err,
    NotesLocation,
    Probe,
    Provider,
    ResultRecord,
    Tracepoint,
)


class ParsedProbe(NamedTuple):
    """One probe with everything the stash writes for it."""

    provider: Provider
    probe: Probe
    args: tuple[ArgsNative | ArgsXlat | ArgsMap, ...]
    tracepoints: tuple[Tracepoint, ...]

    @property
    def spec(self) -> str:
        """``prv:mod:fun:prb``, the per-probe file name (provider without pid)."""
        p = self.probe
        return probespec(self.provider.name, p.mod, p.fun, p.prb)


class _State(enum.Enum):
    START = "PROVIDER, EOF or ERR"
    PROBE = "PROBE"
    NATIVE = "ARGS_NATIVE"
    XLAT = "ARGS_XLAT"
    MAP = "ARGS_MAP"
    TRACEPOINT = "TRACEPOINT"
    NEXT = "PROVIDER or EOF"
    DONE = "nothing"


_ALLOWED: Final[dict[_State, frozenset[type]]] = {
    _State.START: frozenset((Provider, Eof, Err)),
    _State.PROBE: frozenset((Probe,)),
    _State.NATIVE: frozenset((ArgsNative,)),
    _State.XLAT: frozenset((ArgsXlat,)),
    _State.MAP: frozenset((ArgsMap,)),
    _State.TRACEPOINT: frozenset((Tracepoint,)),
    _State.NEXT: frozenset((Provider, Eof)),
    _State.DONE: frozenset(),
}


class StreamChecker:
    """Feed records one by one; :attr:`done` is true once the stream has ended.

    This runs on every record of every registration, twice (receiver and
    writer): :meth:`feed_all` takes a well-formed probe whole, and anything
    else goes through :meth:`feed`, a dict lookup on the exact record type and
    one small method per record kind.  Names need no second check here: a record
    cannot exist unless ``__post_init__`` passed them through the name policy;
    only the combined ``prv:mod:fun:prb`` length is new information.
    """

    def __init__(
        self,
        max_probes: int | None = None,
        max_tracepoints: int | None = None,
        *,
        max_providers: int | None = None,
        notes: bool = False,
    ) -> None:
        """*notes*: the stream answers a ``ParseNoteBlocks`` (tracepoints: unique addresses,
        any order), not a DOF ``ParseRequest`` (tracepoints: regular then is-enabled, each
        strictly ascending).  The stash writer passes the kind of the registration."""
        self.notes = notes
        self._state = _State.START
        self._allowed = _ALLOWED[_State.START]
        self._addrs: set[int] = set()
        self._provider: Provider | None = None
        self._probes_left = 0
        self._probe: Probe | None = None
        self._args: list[ArgsNative | ArgsXlat | ArgsMap] = []
        self._tps: list[Tracepoint] = []
        self._seen: set[str] = set()
        self._max_probes = max_probes
        self._max_tracepoints = max_tracepoints
        self._max_providers = max_providers
        self._tracepoints_left = max_tracepoints
        self._count = 0
        self.probes: list[ParsedProbe] = []
        self.providers: list[Provider] = []
        self.error: Err | None = None

    @property
    def expected(self) -> str:
        """What the checker expects next, for messages."""
        return self._state.value

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def _fail(self, why: str) -> ProtocolError:
        return ProtocolError(f"record {self._count}: {why}")

    def _goto(self, state: _State) -> None:
        self._state = state
        self._allowed = _ALLOWED[state]

    def feed_all(
        self, records: Sequence[ResultRecord], start: int = 0, stop: int | None = None
    ) -> None:
        """Feed ``records[start:stop]``, as :meth:`feed` one by one would.

        A probe whose records are all in the slice and all well-formed is taken
        whole (most of a big stream: 2000 probes are 6000 records); anything
        else — a provider, the end, a probe cut by the slice's end, any record
        breaking a rule — goes through :meth:`feed`, so every error reads the
        same.
        """
        end = len(records) if stop is None else min(stop, len(records))
        feed, take = self.feed, self._take_probe
        probe_state = _State.PROBE
        i = start
        while i < end:
            if self._state is probe_state:
                after = take(records, i, end)
                if after:
                    i = after
                    continue
            feed(records[i])
            i += 1

    def _take_probe(self, records: Sequence[ResultRecord], i: int, end: int) -> int:
        """The index after the well-formed probe at records[i], or 0 (nothing changed):
        the rules of _on_probe … _on_tracepoint, applied to the group at once."""
        probe = records[i]
        if type(probe) is not Probe or self._probes_left <= 0:
            return 0
        if self._max_probes is not None and len(self.probes) >= self._max_probes:
            return 0
        nargc, xargc, ntp = probe.nargc, probe.xargc, probe.ntp
        k = i + 1
        args: tuple[ArgsNative | ArgsXlat | ArgsMap, ...] = ()
        if nargc:
            if k + (3 if xargc else 1) > end:
                return 0
            native = records[k]
            if type(native) is not ArgsNative or len(native.args) != nargc:
                return 0
            if xargc:
                xlat, argmap = records[k + 1], records[k + 2]
                if type(xlat) is not ArgsXlat or len(xlat.args) != xargc:
                    return 0
                if type(argmap) is not ArgsMap or len(argmap.map) != xargc:
                    return 0
                if max(argmap.map) >= nargc:
                    return 0
                args = (native, xlat, argmap)
                k += 3
            else:
                args = (native,)
                k += 1
        after = k + ntp
        if after > end:
            return 0
        if self._tracepoints_left is not None and self._tracepoints_left < ntp:
            return 0
        if ntp == 1:
            tps: tuple[Any, ...] = (records[k],)
            if type(records[k]) is not Tracepoint:
                return 0
        else:
            tps = tuple(records[k:after])
            if not self._tracepoints_ok(tps):
                return 0
        provider = self._provider
        assert provider is not None  # guaranteed by the state table
        spec = probespec(provider.name, probe.mod, probe.fun, probe.prb)
        if len(spec) > NAME_MAX or (not spec.isascii() and len(spec.encode()) > NAME_MAX):
            return 0
        seen = self._seen
        if spec in seen:
            return 0
        seen.add(spec)
        self._count += after - i
        if self._tracepoints_left is not None:
            self._tracepoints_left -= ntp
        self._probes_left -= 1
        self.probes.append(ParsedProbe(provider, probe, args, tps))
        if not self._probes_left:
            self._goto(_State.NEXT)
        return after

    def _tracepoints_ok(self, tps: tuple[Any, ...]) -> bool:
        """The tracepoint rules of the stream's kind hold for one probe's *tps*."""
        for tp in tps:
            if type(tp) is not Tracepoint:
                return False
        if self.notes:
            return len({tp.addr for tp in tps}) == len(tps)
        last = tps[0]
        for tp in tps[1:]:
            if last.is_enabled and not tp.is_enabled:
                return False
            if last.is_enabled == tp.is_enabled and tp.addr <= last.addr:
                return False
            last = tp
        return True

    def feed(self, rec: ResultRecord) -> None:
        kind = type(rec)
        if kind not in self._allowed:
            raise self._fail(f"unexpected {kind.__name__}, expected {self._state.value}")
        self._count += 1
        _HANDLERS[kind](self, rec)

    def _on_err(self, rec: Err) -> None:
        self.error = rec
        self._goto(_State.DONE)

    def _on_eof(self, rec: Eof) -> None:
        self._goto(_State.DONE)

    def _on_provider(self, rec: Provider) -> None:
        if self._max_providers is not None and len(self.providers) >= self._max_providers:
            raise self._fail(f"more than {self._max_providers} providers")
        self._provider = rec
        self.providers.append(rec)
        self._probes_left = rec.nprobes
        self._goto(_State.PROBE if rec.nprobes else _State.NEXT)

    def _on_probe(self, probe: Probe) -> None:
        provider = self._provider
        assert provider is not None  # guaranteed by the state table
        self._probes_left -= 1
        if self._max_probes is not None and len(self.probes) >= self._max_probes:
            raise self._fail(f"more than {self._max_probes} probes")
        # names hold no ':', so the spec string stands for the four names (probespec)
        spec = probespec(provider.name, probe.mod, probe.fun, probe.prb)
        if len(spec) > NAME_MAX or (not spec.isascii() and len(spec.encode()) > NAME_MAX):
            raise self._fail(f'probe "{printable(spec)}" too long for a file name')
        if spec in self._seen:
            raise self._fail(f"duplicate probe {printable(spec)}")
        self._seen.add(spec)
        self._probe = probe
        self._args = []
        self._tps = []
        self._addrs = set()
        self._goto(_State.NATIVE if probe.nargc else _State.TRACEPOINT)

    def _on_native(self, rec: ArgsNative) -> None:
        probe = self._probe
        assert probe is not None
        if len(rec.args) != probe.nargc:
            raise self._fail(f"ARGS_NATIVE has {len(rec.args)} types, nargc is {probe.nargc}")
        self._args.append(rec)
        self._goto(_State.XLAT if probe.xargc else _State.TRACEPOINT)

    def _on_xlat(self, rec: ArgsXlat) -> None:
        probe = self._probe
        assert probe is not None
        if len(rec.args) != probe.xargc:
            raise self._fail(f"ARGS_XLAT has {len(rec.args)} types, xargc is {probe.xargc}")
        self._args.append(rec)
        self._goto(_State.MAP)

    def _on_map(self, rec: ArgsMap) -> None:
        probe = self._probe
        assert probe is not None
        if len(rec.map) != probe.xargc:
            raise self._fail(f"ARGS_MAP has {len(rec.map)} entries, xargc is {probe.xargc}")
        if max(rec.map) >= probe.nargc:
            raise self._fail(f"ARGS_MAP entry {max(rec.map)} not below nargc {probe.nargc}")
        self._args.append(rec)
        self._goto(_State.TRACEPOINT)

    def _on_tracepoint(self, tp: Tracepoint) -> None:
        tps = self._tps
        if self.notes:
            addrs = self._addrs
            if tp.addr in addrs:
                raise self._fail(f"tracepoint {tp.addr:#x} appears twice in one probe")
            addrs.add(tp.addr)
        elif tps:
            last = tps[-1]
            if last.is_enabled and not tp.is_enabled:
                raise self._fail("regular tracepoint after an is-enabled one")
            if last.is_enabled == tp.is_enabled and tp.addr <= last.addr:
                raise self._fail(f"tracepoint {tp.addr:#x} not above {last.addr:#x}")
        if self._tracepoints_left is not None:
            self._tracepoints_left -= 1
            if self._tracepoints_left < 0:
                raise self._fail(f"more than {self._max_tracepoints} tracepoints")
        tps.append(tp)
        probe = self._probe
        assert probe is not None
        if len(tps) == probe.ntp:
            assert self._provider is not None
            self.probes.append(ParsedProbe(self._provider, probe, tuple(self._args), tuple(tps)))
            self._probe = None
            self._goto(_State.PROBE if self._probes_left else _State.NEXT)


# Unbound, at module level: bound methods in the checker itself would make a cycle
# that keeps every record it collected alive until the cyclic GC runs (measured:
# 20 MB of a hostile DOF's argument types held after the registration).
_HANDLERS: Final[dict[type, Callable[[StreamChecker, Any], None]]] = {
    Err: StreamChecker._on_err,
    Eof: StreamChecker._on_eof,
    Provider: StreamChecker._on_provider,
    Probe: StreamChecker._on_probe,
    ArgsNative: StreamChecker._on_native,
    ArgsXlat: StreamChecker._on_xlat,
    ArgsMap: StreamChecker._on_map,
    Tracepoint: StreamChecker._on_tracepoint,
}


def check_stream(
    records: list[ResultRecord], *, notes: bool = False, **limits: int | None
) -> StreamChecker:
    """Check a complete stream; raises :class:`ProtocolError` if it is bad or unfinished."""
    checker = StreamChecker(**limits, notes=notes)
    checker.feed_all(records)
    if not checker.done:
        raise ProtocolError(f"stream ended early, expected {checker.expected}")
    return checker


def check_location(records: list[ResultRecord]) -> NotesLocation | Err:
    """The answer to a ``LocateNotes`` (``Log`` records removed): exactly one record,
    ``NotesLocation`` or ``Err``; raises :class:`ProtocolError` otherwise."""
    if len(records) != 1 or not isinstance(records[0], NotesLocation | Err):
        kinds = ", ".join(type(r).__name__ for r in records[:4]) or "nothing"
        raise ProtocolError(f"LocateNotes answered {kinds}, expected one NotesLocation or Err")
    return records[0]
