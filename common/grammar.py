"""The record-stream grammar, enforced with a state table.

Both the receiver (checking what the parser child sends) and the stash writer
(checking what the receiver forwards) run every record of a request through a
:class:`StreamChecker`.  A record that is not allowed in the current state
rejects the whole request: the sender is treated as broken or compromised.

    stream   := ERR | provider* EOF
    provider := PROVIDER probe{nprobes}
    probe    := PROBE [ARGS_NATIVE [ARGS_XLAT ARGS_MAP]] TRACEPOINT{ntp}

plus the cross-record rules: argument counts match ``nargc``/``xargc``, every
argmap entry is below ``nargc``, regular tracepoints come first and each class
is strictly ascending, and no ``prv:mod:fun:prb`` appears twice.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple

from common.errors import ProtocolError
from common.names import NameRefused, check_probespec
from common.records import (
    ArgsMap,
    ArgsNative,
    ArgsXlat,
    Eof,
    Err,
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
        return f"{self.provider.name}:{p.mod}:{p.fun}:{p.prb}"


class _State(enum.Enum):
    START = "provider, EOF or ERR"
    PROBE = "PROBE"
    NATIVE = "ARGS_NATIVE"
    XLAT = "ARGS_XLAT"
    MAP = "ARGS_MAP"
    TRACEPOINT = "TRACEPOINT"
    NEXT = "PROVIDER or EOF"
    DONE = "nothing"


_ALLOWED: Final[dict[_State, tuple[type, ...]]] = {
    _State.START: (Provider, Eof, Err),
    _State.PROBE: (Probe,),
    _State.NATIVE: (ArgsNative,),
    _State.XLAT: (ArgsXlat,),
    _State.MAP: (ArgsMap,),
    _State.TRACEPOINT: (Tracepoint,),
    _State.NEXT: (Provider, Eof),
    _State.DONE: (),
}


class StreamChecker:
    """Feed records one by one; :attr:`result` is set once the stream has ended."""

    def __init__(self, max_probes: int | None = None, max_tracepoints: int | None = None) -> None:
        self._state = _State.START
        self._provider: Provider | None = None
        self._probes_left = 0
        self._probe: Probe | None = None
        self._args: list[ArgsNative | ArgsXlat | ArgsMap] = []
        self._tps: list[Tracepoint] = []
        self._seen: set[str] = set()
        self._max_probes = max_probes
        self._max_tracepoints = max_tracepoints
        self._ntracepoints = 0
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

    def feed(self, rec: ResultRecord) -> None:
        state = self._state
        if not isinstance(rec, _ALLOWED[state]):
            raise self._fail(f"unexpected {type(rec).__name__}, expected {state.value}")
        self._count += 1
        match rec:
            case Err():
                self.error = rec
                self._state = _State.DONE
            case Eof():
                self._state = _State.DONE
            case Provider():
                self._provider = rec
                self.providers.append(rec)
                self._probes_left = rec.nprobes
                self._state = _State.PROBE if rec.nprobes else _State.NEXT
            case Probe():
                self._start_probe(rec)
            case ArgsNative():
                probe = self._require_probe()
                if len(rec.args) != probe.nargc:
                    raise self._fail(
                        f"ARGS_NATIVE has {len(rec.args)} types, nargc is {probe.nargc}"
                    )
                self._args.append(rec)
                self._state = _State.XLAT if probe.xargc else _State.TRACEPOINT
            case ArgsXlat():
                probe = self._require_probe()
                if len(rec.args) != probe.xargc:
                    raise self._fail(f"ARGS_XLAT has {len(rec.args)} types, xargc is {probe.xargc}")
                self._args.append(rec)
                self._state = _State.MAP
            case ArgsMap():
                probe = self._require_probe()
                if len(rec.map) != probe.xargc:
                    raise self._fail(f"ARGS_MAP has {len(rec.map)} entries, xargc is {probe.xargc}")
                bad = [i for i in rec.map if i >= probe.nargc]
                if bad:
                    raise self._fail(f"ARGS_MAP entry {bad[0]} not below nargc {probe.nargc}")
                self._args.append(rec)
                self._state = _State.TRACEPOINT
            case Tracepoint():
                self._add_tracepoint(rec)

    def _require_probe(self) -> Probe:
        assert self._probe is not None  # guaranteed by the state table
        return self._probe

    def _start_probe(self, probe: Probe) -> None:
        assert self._provider is not None
        self._probes_left -= 1
        if self._max_probes is not None and len(self.probes) >= self._max_probes:
            raise self._fail(f"more than {self._max_probes} probes")
        spec = f"{self._provider.name}:{probe.mod}:{probe.fun}:{probe.prb}"
        try:
            check_probespec(self._provider.name, probe.mod, probe.fun, probe.prb)
        except NameRefused as err:
            raise self._fail(str(err)) from None
        if spec in self._seen:
            raise self._fail(f"duplicate probe {spec}")
        self._seen.add(spec)
        self._probe = probe
        self._args = []
        self._tps = []
        if probe.xargc and not probe.nargc:
            raise self._fail("xargc without nargc")
        self._state = _State.NATIVE if probe.nargc else _State.TRACEPOINT

    def _add_tracepoint(self, tp: Tracepoint) -> None:
        probe = self._require_probe()
        if self._tps:
            last = self._tps[-1]
            if last.is_enabled and not tp.is_enabled:
                raise self._fail("regular tracepoint after an is-enabled one")
            if last.is_enabled == tp.is_enabled and tp.addr <= last.addr:
                raise self._fail(f"tracepoint {tp.addr:#x} not above {last.addr:#x}")
        self._ntracepoints += 1
        if self._max_tracepoints is not None and self._ntracepoints > self._max_tracepoints:
            raise self._fail(f"more than {self._max_tracepoints} tracepoints")
        self._tps.append(tp)
        if len(self._tps) == probe.ntp:
            assert self._provider is not None
            self.probes.append(
                ParsedProbe(self._provider, probe, tuple(self._args), tuple(self._tps))
            )
            self._probe = None
            self._state = _State.NEXT if self._probes_left == 0 else _State.PROBE
        else:
            self._state = _State.TRACEPOINT


def check_stream(records: list[ResultRecord], **limits: int | None) -> StreamChecker:
    """Check a complete stream; raises :class:`ProtocolError` if it is bad or unfinished."""
    checker = StreamChecker(**limits)
    for rec in records:
        checker.feed(rec)
    if not checker.done:
        raise ProtocolError(f"stream ended early, expected {checker.expected}")
    return checker
