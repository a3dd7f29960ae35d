"""The shared name policy: refused, never escaped."""

from __future__ import annotations

import pytest

from common.names import NameRefused, check_name, check_probespec, decode_name


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
