"""The C byte layout of upstream's ``dof_parsed_t`` records, as stored in stash files.

Facts we rely on (upstream's ``libcommon/usdt_parser.h``, ``DOF_PARSED_VERSION 3``,
x86_64; byte-checked against upstream 2.0.7's own files in ``tests/golden/upstream-2.0.7``):

* a record is ``u64 size; u32 type; 4 zero bytes; union …`` and records are
  packed back to back with no alignment; ``size`` is the exact record length;
* PROVIDER = ``u64 nprobes`` + name + NUL (head 24);
* PROBE = ``u64 ntp, nargc, xargc`` + ``mod\\0fun\\0prb\\0`` (head 40);
* TRACEPOINT from DOF = ``u64 addr, u32 is_enabled`` then zeros up to
  ``sizeof(dof_parsed_t)`` = 48 (the empty ``args`` string included);
  TRACEPOINT from ELF notes = the same head (28) then the source-argument
  string and its NUL, ``28 + len + 1`` bytes.  Decoding tells them apart:
  exactly 48 bytes with an all-zero payload is the DOF form (``args`` None),
  anything else must be one NUL-terminated string filling the payload;
* ARGS_NATIVE / ARGS_XLAT = the strings, each with its NUL (head 16);
  ARGS_MAP = ``xargc`` bytes (head 16); ERR = ``int err_no`` + message + NUL
  (head 20); EOF = 16 bytes, size and type only (never written to files);
* a per-probe stash file is ``u64 DOF_PARSED_VERSION`` followed by the
  PROVIDER record (``nprobes`` of the whole provider), the PROBE record,
  ``[ARGS_NATIVE [ARGS_XLAT ARGS_MAP]]`` and ``ntp`` TRACEPOINT records.

Bump ``DOF_PARSED_VERSION`` only together with upstream: the consumer accepts
files whose version equals its own exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from common.errors import StashFormatError
from common.records import (
    DIT_ARGS_MAP,
    DIT_ARGS_NATIVE,
    DIT_ARGS_XLAT,
    DIT_EOF,
    DIT_ERR,
    DIT_PROBE,
    DIT_PROVIDER,
    DIT_TRACEPOINT,
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

DOF_PARSED_VERSION: Final = 3

VERSION: Final = struct.Struct("<Q")
_HEAD: Final = struct.Struct("<QI4x")  # size, type, padding
_PROVIDER: Final = struct.Struct("<QI4xQ")
_PROBE: Final = struct.Struct("<QI4xQQQ")
_TRACEPOINT: Final = struct.Struct("<QI4xQI")
#: a DOF tracepoint: the head, then zeros up to sizeof(dof_parsed_t)
_TRACEPOINT_DOF: Final = struct.Struct("<QI4xQI20x")
_ERR: Final = struct.Struct("<QI4xi")

SIZEOF_DOF_PARSED: Final = 48
_TRACEPOINT_PAD: Final = bytes(SIZEOF_DOF_PARSED - 28)
HEADSZ: Final = {
    DIT_PROVIDER: 24,
    DIT_PROBE: 40,
    DIT_TRACEPOINT: 28,
    DIT_ERR: 20,
    DIT_EOF: 16,
    DIT_ARGS_NATIVE: 16,
    DIT_ARGS_XLAT: 16,
    DIT_ARGS_MAP: 16,
}

VERSION_BYTES: Final = VERSION.pack(DOF_PARSED_VERSION)


def _strings(values: Sequence[str]) -> bytes:
    # one join and one encode: UTF-8 of the joined text is the joined UTF-8
    return ("\0".join(values) + "\0").encode("utf-8")


def _encode_provider(rec: Provider) -> bytes:
    tail = rec.name.encode("utf-8") + b"\0"
    return _PROVIDER.pack(24 + len(tail), DIT_PROVIDER, rec.nprobes) + tail


def _encode_probe(rec: Probe) -> bytes:
    tail = _strings((rec.mod, rec.fun, rec.prb))
    return _PROBE.pack(40 + len(tail), DIT_PROBE, rec.ntp, rec.nargc, rec.xargc) + tail


def _encode_tracepoint(rec: Tracepoint) -> bytes:
    if rec.args is None:
        return _TRACEPOINT_DOF.pack(SIZEOF_DOF_PARSED, DIT_TRACEPOINT, rec.addr, rec.is_enabled)
    tail = rec.args.encode("utf-8") + b"\0"
    return _TRACEPOINT.pack(28 + len(tail), DIT_TRACEPOINT, rec.addr, rec.is_enabled) + tail


def _encode_native(rec: ArgsNative) -> bytes:
    tail = _strings(rec.args)
    return _HEAD.pack(16 + len(tail), DIT_ARGS_NATIVE) + tail


def _encode_xlat(rec: ArgsXlat) -> bytes:
    tail = _strings(rec.args)
    return _HEAD.pack(16 + len(tail), DIT_ARGS_XLAT) + tail


def _encode_map(rec: ArgsMap) -> bytes:
    return _HEAD.pack(16 + len(rec.map), DIT_ARGS_MAP) + bytes(rec.map)


def _encode_err(rec: Err) -> bytes:
    tail = rec.message.encode("utf-8") + b"\0"
    return _ERR.pack(20 + len(tail), DIT_ERR, rec.errno) + tail


def _encode_eof(rec: Eof) -> bytes:
    return _HEAD.pack(16, DIT_EOF)


# by exact type: a writer of 20000 probes encodes 60000 records
_ENCODERS: Final[dict[type, Callable[[Any], bytes]]] = {
    Provider: _encode_provider,
    Probe: _encode_probe,
    Tracepoint: _encode_tracepoint,
    ArgsNative: _encode_native,
    ArgsXlat: _encode_xlat,
    ArgsMap: _encode_map,
    Err: _encode_err,
    Eof: _encode_eof,
}


def encode_record(rec: ResultRecord) -> bytes:
    """The exact bytes upstream's parser would emit for *rec*."""
    encode = _ENCODERS.get(type(rec))
    if encode is None:
        raise TypeError(f"not a record with a stash form: {rec!r}")
    return encode(rec)


def encode_probe_file(
    provider: Provider,
    probe: Probe,
    args: Sequence[ArgsNative | ArgsXlat | ArgsMap],
    tracepoints: Sequence[Tracepoint],
    *,
    provider_record: bytes | None = None,
) -> bytes:
    """One ``parsed/$prv:$mod:$fun:$prb`` file, byte for byte.

    Every probe file of a provider starts with the same PROVIDER record: a
    writer of many probes passes ``encode_record(provider)`` once as
    *provider_record*.
    """
    if provider_record is None:
        provider_record = encode_record(provider)
    parts = [VERSION_BYTES, provider_record, _encode_probe(probe)]
    # plain loops: a list comprehension is a function call of its own (Python 3.11),
    # and most probes have no arguments and one tracepoint (20000 files a DOF)
    for a in args:
        parts.append(_ENCODERS[type(a)](a))
    for t in tracepoints:
        parts.append(_encode_tracepoint(t))
    return b"".join(parts)


def _cstrings(payload: bytes, count: int, what: str) -> list[str]:
    parts = payload.split(b"\0")
    if count and (len(parts) < count + 1):
        raise StashFormatError(f"{what}: expected {count} NUL-terminated strings")
    try:
        return [p.decode("utf-8") for p in parts[:count]]
    except UnicodeDecodeError as err:
        raise StashFormatError(f"{what}: string is not UTF-8") from err


def decode_records(data: bytes | memoryview) -> list[ResultRecord]:
    """Split packed C records, with the newest consumer's per-record checks."""
    view = memoryview(data)
    out: list[ResultRecord] = []
    off = 0
    while off < len(view):
        remaining = len(view) - off
        if remaining < 16:
            raise StashFormatError(f"record at {off}: {remaining} bytes left, header needs 16")
        size, kind = _HEAD.unpack_from(view, off)
        head = HEADSZ.get(kind)
        if head is None:
            raise StashFormatError(f"record at {off}: unknown type {kind}")
        minimum = (
            16 if kind in (DIT_EOF, DIT_ARGS_NATIVE, DIT_ARGS_XLAT, DIT_ARGS_MAP) else head + 1
        )
        if size < minimum or size > remaining:
            raise StashFormatError(f"record at {off}: size {size} invalid ({remaining} bytes left)")
        rec = bytes(view[off : off + size])
        payload = rec[head:]
        try:
            out.append(_decode_one(kind, rec, payload))
        except (ValueError, TypeError) as err:
            raise StashFormatError(f"record at {off}: {err}") from err
        off += size
    return out


def _decode_one(kind: int, rec: bytes, payload: bytes) -> ResultRecord:
    if kind == DIT_PROVIDER:
        (nprobes,) = struct.unpack_from("<Q", rec, 16)
        (name,) = _cstrings(payload, 1, "provider name")
        return Provider(name=name, nprobes=nprobes)
    if kind == DIT_PROBE:
        ntp, nargc, xargc = struct.unpack_from("<QQQ", rec, 16)
        if nargc > 255 or xargc > 255:
            raise ValueError(f"argument counts {nargc}/{xargc} above 255")
        mod, fun, prb = _cstrings(payload, 3, "probe names")
        return Probe(mod=mod, fun=fun, prb=prb, ntp=ntp, nargc=nargc, xargc=xargc)
    if kind == DIT_TRACEPOINT:
        addr, is_enabled = struct.unpack_from("<QI", rec, 16)
        if len(rec) == SIZEOF_DOF_PARSED and payload == _TRACEPOINT_PAD:
            return Tracepoint(addr=addr, is_enabled=bool(is_enabled))  # DOF: no args
        if not payload.endswith(b"\0") or payload.find(b"\0") != len(payload) - 1:
            raise ValueError("tracepoint argument string is not one NUL-terminated string")
        try:
            sargs = payload[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError("tracepoint argument string is not UTF-8") from err
        return Tracepoint(addr=addr, is_enabled=bool(is_enabled), args=sargs)
    if kind in (DIT_ARGS_NATIVE, DIT_ARGS_XLAT):
        count = payload.count(b"\0")
        if payload and not payload.endswith(b"\0"):
            raise ValueError("argument types not NUL-terminated")
        args = _cstrings(payload, count, "argument types")
        return ArgsNative(args=args) if kind == DIT_ARGS_NATIVE else ArgsXlat(args=args)
    if kind == DIT_ARGS_MAP:
        return ArgsMap(map=list(payload))
    if kind == DIT_ERR:
        (errno,) = struct.unpack_from("<i", rec, 16)
        (message,) = _cstrings(payload, 1, "error message")
        return Err(errno=errno, message=message)
    return Eof()


class ProbeFile:
    """A decoded per-probe stash file."""

    __slots__ = ("args", "probe", "provider", "tracepoints")

    def __init__(
        self,
        provider: Provider,
        probe: Probe,
        args: list[ArgsNative | ArgsXlat | ArgsMap],
        tracepoints: list[Tracepoint],
    ) -> None:
        self.provider = provider
        self.probe = probe
        self.args = args
        self.tracepoints = tracepoints


def decode_probe_file(data: bytes) -> ProbeFile:
    """Parse a per-probe file with every check the newest ``dtrace`` consumer makes."""
    if len(data) < VERSION.size:
        raise StashFormatError(f"file of {len(data)} bytes has no version word")
    (version,) = VERSION.unpack_from(data)
    if version != DOF_PARSED_VERSION:
        raise StashFormatError(f"parsed version {version}, expected {DOF_PARSED_VERSION}")
    records = decode_records(memoryview(data)[VERSION.size :])
    if len(records) < 2:
        raise StashFormatError("file lacks its PROVIDER and PROBE records")
    provider, probe, *rest = records
    if not isinstance(provider, Provider):
        raise StashFormatError("first record is not PROVIDER")
    if not isinstance(probe, Probe):
        raise StashFormatError("second record is not PROBE")
    args: list[ArgsNative | ArgsXlat | ArgsMap] = []
    pos = 0
    if probe.nargc:
        native = rest[pos] if pos < len(rest) else None
        if not isinstance(native, ArgsNative) or len(native.args) != probe.nargc:
            raise StashFormatError(f"expected ARGS_NATIVE with {probe.nargc} types")
        args.append(native)
        pos += 1
    if probe.xargc:
        xlat = rest[pos] if pos < len(rest) else None
        amap = rest[pos + 1] if pos + 1 < len(rest) else None
        if not isinstance(xlat, ArgsXlat) or len(xlat.args) != probe.xargc:
            raise StashFormatError(f"expected ARGS_XLAT with {probe.xargc} types")
        if not isinstance(amap, ArgsMap) or len(amap.map) < probe.xargc:
            raise StashFormatError(f"expected ARGS_MAP with {probe.xargc} entries")
        if any(i >= probe.nargc for i in amap.map[: probe.xargc]):
            raise StashFormatError(f"ARGS_MAP entry not below nargc {probe.nargc}")
        args += [xlat, amap]
        pos += 2
    tracepoints = rest[pos:]
    if len(tracepoints) != probe.ntp or not all(isinstance(t, Tracepoint) for t in tracepoints):
        raise StashFormatError(f"expected exactly {probe.ntp} TRACEPOINT records")
    return ProbeFile(provider, probe, args, tracepoints)  # type: ignore[arg-type]
