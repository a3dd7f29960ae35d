"""The shared name policy: refused, never escaped."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from common.names import NameRefused, check_argtype, check_name, check_probespec, decode_name
from common.records import DIT_ARGS_NATIVE, DIT_PROBE, ArgsNative, Probe


@pytest.mark.parametrize(
    "bad",
    ["", ".", "..", "../../x", "a/b", "x:y", "tab\there", "nl\n", "del\x7f", "esc\x1b[31m"],
)
@pytest.mark.parametrize("kind", ["provider", "module", "function", "probe"])
def test_refused(kind: str, bad: str) -> None:
    with pytest.raises(NameRefused, match=f"^{kind} name"):
        check_name(kind, bad)


@pytest.mark.parametrize("good", ["a", "...", "a.b", "libc.so.6", "_Z3foov", "caf\u00e9", "a b"])
def test_accepted(good: str) -> None:
    check_name("function", good)


@pytest.mark.parametrize(("kind", "limit"), [("provider", 63), ("probe", 63), ("function", 127)])
def test_length_limits_count_bytes(kind: str, limit: int) -> None:
    check_name(kind, "x" * limit)
    with pytest.raises(NameRefused, match="too long"):
        check_name(kind, "x" * (limit + 1))
    # two-byte characters: the code-point count fits, the byte count does not
    with pytest.raises(NameRefused, match="too long"):
        check_name(kind, "\u00e9" * (limit // 2 + 1))


def test_non_utf8_refused() -> None:
    with pytest.raises(NameRefused, match="not valid UTF-8"):
        decode_name("probe", b"\xff\xfe")


def test_full_spec_must_fit_a_file_name() -> None:
    check_probespec("p" * 63, "m" * 63, "f" * 63, "x" * 63)  # 252 + 3 = 255
    with pytest.raises(NameRefused, match="too long for a file name"):
        check_probespec("p" * 63, "m" * 63, "f" * 64, "x" * 63)


NAMES = [
    "a", "...", "a.b", "caf\u00e9", "a b", "~", "", ".", "..", "a/b", "x:y", "tab\there",
    "del\x7f", "\u00a0nbsp", "\u2028", "x" * 63, "x" * 64, "x" * 127, "x" * 128,
    "\u00e9" * 31, "\u00e9" * 32, "\u00e9" * 63, "\u00e9" * 64,
]  # fmt: skip


def _accepts(check: Callable[[], None]) -> bool:
    try:
        check()
    except NameRefused:
        return False
    return True


def _decodes(raw: bytes, kind: type) -> bool:
    try:
        msgspec.msgpack.decode(raw, type=kind)
    except msgspec.ValidationError:
        return False
    return True


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("field", "kind"), [("mod", "module"), ("fun", "function"), ("prb", "probe")]
)
def test_a_probe_record_decodes_exactly_when_check_name_accepts(
    field: str, kind: str, name: str
) -> None:
    """Probe's inline fast path for its three names agrees with check_name."""
    names = {"mod": "m", "fun": "f", "prb": "p", field: name}
    raw = msgspec.msgpack.encode([DIT_PROBE, names["mod"], names["fun"], names["prb"], 1, 0, 0])
    assert _decodes(raw, Probe) == _accepts(lambda: check_name(kind, name))


@pytest.mark.parametrize(
    "argtype", ["int", "char *", "", "caf\u00e9", "tab\there", "del\x7f", "x" * 127, "x" * 128]
)
def test_an_argument_record_decodes_exactly_when_check_argtype_accepts(argtype: str) -> None:
    raw = msgspec.msgpack.encode([DIT_ARGS_NATIVE, ["int", argtype]])
    assert _decodes(raw, ArgsNative) == _accepts(lambda: check_argtype(argtype))
