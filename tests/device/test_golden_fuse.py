"""Golden FUSE/CUSE wire samples (tests/golden/fuse/*.hex): decode requests, re-encode replies.

Each sample: ``#`` comment lines (what it is, where it came from, ``kind:``),
the message as hex, then ``=== expected`` and JSON.  Requests must decode to
the JSON exactly; replies must be produced byte for byte by the named encoder
with the given arguments, and their out header must match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common import fuse_abi as abi
from dtprobed.device import fuse_proto as proto

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "fuse"
SAMPLES = sorted(GOLDEN.glob("*.hex"))


def load(path: Path) -> tuple[dict[str, str], bytes, Any]:
    meta: dict[str, str] = {}
    hex_lines: list[str] = []
    text, _, expected = path.read_text().partition("=== expected\n")
    for line in text.splitlines():
        if line.startswith("#"):
            key, sep, value = line[1:].strip().partition(": ")
            if sep:
                meta[key] = value
        elif line.strip():
            hex_lines.append(line)
    return meta, bytes.fromhex(" ".join(hex_lines)), json.loads(expected)


def test_there_are_samples_of_both_kinds() -> None:
    kinds = {load(p)[0]["kind"] for p in SAMPLES}
    assert kinds == {"request", "reply"} and len(SAMPLES) >= 10


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_golden_sample(path: Path) -> None:
    meta, data, expected = load(path)
    if meta["kind"] == "request":
        assert proto.decode_request(data).to_json() == expected
    else:
        encoder = getattr(proto, expected["encode"])
        kwargs = dict(expected["kwargs"])
        if "in_iovs" in kwargs:
            kwargs["in_iovs"] = [tuple(iov) for iov in kwargs["in_iovs"]]
        assert encoder(**kwargs) == data
        assert abi.FUSE_OUT_HEADER.unpack_from(data)._asdict() == expected["header"]
