"""A fake parser child that speaks the frame protocol but lies: ``python hostile_parser.py MODE``.

It reads ParseRequest frames like the real child and answers each according to
MODE, most of them breaking the protocol in one specific way.  ``honest`` is
the control: a valid answer the host must accept.  Records are written as raw
msgpack arrays, because the record classes refuse to build the bad ones.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import time
from typing import Any

import msgspec

_encode = msgspec.msgpack.encode
PROVIDER, PROBE, TRACEPOINT, ERR, EOF, NATIVE, XLAT, MAP, LOG = 0, 1, 2, 3, 4, 5, 6, 7, 100


def frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def batch(*records: list[Any]) -> bytes:
    return frame(_encode(list(records)))


def probe(name: str, ntp: int = 1) -> list[Any]:
    return [PROBE, "mod", "fun", name, ntp, 0, 0]


ANSWERS: dict[str, bytes] = {
    "honest": batch([PROVIDER, "prov", 1], probe("p"), [TRACEPOINT, 16, False], [EOF]),
    "honest-err": batch([ERR, 22, "no"]),
    "wrong-grammar": batch(probe("p"), [TRACEPOINT, 16, False], [EOF]),
    "eof-missing-tracepoint": batch([PROVIDER, "prov", 1], probe("p", ntp=2), [TRACEPOINT, 1, False], [EOF]),
    "bad-name": batch([PROVIDER, "../x", 1], probe("p"), [TRACEPOINT, 16, False], [EOF]),
    "colon-name": batch([PROVIDER, "prov", 1], probe("a:b"), [TRACEPOINT, 16, False], [EOF]),
    "bad-utf8": frame(bytes([0x91, 0x93, 0x00, 0xA2, 0xFF, 0xFE, 0x01])),
    "unknown-tag": batch([42, 1]),
    "extra-field": batch([EOF, 1]),
    "negative-addr": batch([PROVIDER, "prov", 1], probe("p"), [TRACEPOINT, -1, False], [EOF]),
    "undecodable": frame(b"\xc1"),
    "not-a-batch": frame(_encode([EOF])),  # a record, not an array of records
    "oversized-frame": struct.pack("<I", (1 << 20) + 1) + bytes(64),
    "zero-length-frame": struct.pack("<I", 0),
    "records-after-eof": batch([EOF], [EOF]),
    "frame-after-eof": batch([EOF]) + batch([EOF]),
    "err-after-records": batch([PROVIDER, "prov", 0], [ERR, 22, "late"]),
    "duplicate-probe": batch(
        [PROVIDER, "prov", 2], probe("p"), [TRACEPOINT, 1, False], probe("p"), [TRACEPOINT, 2, False], [EOF]
    ),
    "unsorted-tracepoints": batch([PROVIDER, "prov", 1], probe("p", 2), [TRACEPOINT, 9, False], [TRACEPOINT, 3, False], [EOF]),
    "too-many-providers": batch(*([[PROVIDER, f"p{i}", 0] for i in range(3)] + [[EOF]])),
    "too-many-probes": batch([PROVIDER, "prov", 5], *[r for i in range(5) for r in (probe(f"p{i}"), [TRACEPOINT, 1, False])], [EOF]),
    "args-mismatch": batch([PROVIDER, "prov", 1], [PROBE, "mod", "fun", "p", 1, 2, 0], [NATIVE, ["int"]], [TRACEPOINT, 1, False], [EOF]),
    "log-flood": batch(*[[LOG, 20, f"line {i}"] for i in range(100)]) + batch([EOF]),
    "dies-mid-stream": batch([PROVIDER, "prov", 1]),
}  # fmt: skip


def read_exactly(n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def main() -> None:
    mode = sys.argv[1]
    if mode == "unprompted-on-sigusr1":
        # a record nobody asked for, sent between requests when the test says so
        signal.signal(signal.SIGUSR1, lambda *_: os.write(1, batch([EOF])))
    answer = ANSWERS.get(mode, ANSWERS["honest"])
    while True:
        header = read_exactly(4)
        if len(header) < 4:
            os._exit(0)
        read_exactly(struct.unpack("<I", header)[0])
        if mode.startswith("slow-"):
            # a parse that takes 8 pauses in all but is never silent for one whole
            # pause ("slow-progress": a Log record after each) or is ("slow-silent")
            pause = float(os.environ["HOSTILE_PAUSE"])
            for i in range(8):
                time.sleep(pause)
                if mode == "slow-progress":
                    os.write(1, batch([LOG, 10, f"still parsing ({i})"]))
            if mode == "slow-silent":
                time.sleep(pause * 2)
        os.write(1, answer)
        if mode == "dies-mid-stream":
            os._exit(3)


if __name__ == "__main__":
    main()
