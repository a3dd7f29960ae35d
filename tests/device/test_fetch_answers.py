"""The daemon's side of the fetch helper's answers, against real helper processes.

The real helper (``dtprobed.device.fetchd``) reads real memory of this process; a
scripted one sends answers the real one never would.
"""

from __future__ import annotations

import ctypes
import os
import sys

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from common.errors import RequestRejected
from dtprobed.device.fetch import FetchPool

SMALL_DOF = build_dof([ProviderSpec("prov", [ProbeSpec("f", f"p{i}", [1]) for i in range(3)])]).data

# Answers every request with the DOF given in hex, then EXTRA more bytes.
SCRIPTED = r"""
import os, struct, sys
dof, extra = bytes.fromhex(sys.argv[1]), int(sys.argv[2])
code = struct.Struct("<q")
while os.read(0, 32):
    answer = code.pack(64) + dof[:64] + code.pack(len(dof) - 64) + dof[64:] + b"x" * extra
    os.write(1, answer)
"""


def _scripted_pool(extra: int) -> FetchPool:
    return FetchPool(argv=[sys.executable, "-c", SCRIPTED, SMALL_DOF.hex(), str(extra)], timeout=2)


def _fetch(pool: FetchPool, address: int) -> bytes:
    return pool.fetch(
        os.getpid(), os.getuid(), address, max_size=1 << 20, stream_limit=(1 << 16) - 1
    )


def test_a_small_dof_comes_whole_and_the_helper_serves_the_next_request() -> None:
    """Its header and the rest arrive in one write, read at once: the bytes are the
    caller's, and nothing of one answer is left over for the next."""
    buf = ctypes.create_string_buffer(SMALL_DOF, len(SMALL_DOF))
    pool = FetchPool()
    try:
        assert _fetch(pool, ctypes.addressof(buf)) == SMALL_DOF
        (helper,) = pool._all
        assert _fetch(pool, ctypes.addressof(buf)) == SMALL_DOF
        assert pool._all == [helper]  # the same helper, not abandoned
    finally:
        pool.close()


def test_an_answer_longer_than_its_header_claims_abandons_the_helper() -> None:
    """Bytes beyond what the DOF header announced would be read as the start of the
    next request's answer: the helper is treated as broken, and the next request
    gets a fresh one."""
    pool = _scripted_pool(extra=5)
    try:
        with pytest.raises(RequestRejected):
            _fetch(pool, 0x1000)
        assert pool._all == []
        assert pool.stuck_total() <= 1  # killed: reaped once it has ended
    finally:
        pool.close()


def test_an_answer_of_exactly_the_announced_size_is_accepted() -> None:
    pool = _scripted_pool(extra=0)
    try:
        assert _fetch(pool, 0x1000) == SMALL_DOF
        assert _fetch(pool, 0x1000) == SMALL_DOF
    finally:
        pool.close()
