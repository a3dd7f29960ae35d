"""CUSE mode against the fake kernel: CUSE_INIT, the ioctl-retry sequence, chunking, interleaving."""

from __future__ import annotations

import errno
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper, many_probes_dof
from common.errors import RequestRejected
from common.ioctl import (
    DTRACEHIOC_ADD,
    DTRACEHIOC_ADDDOF,
    DTRACEHIOC_HASUSDT,
    DTRACEHIOC_HASUSDT_32,
    DTRACEHIOC_REMOVE,
)
from dtprobed.device.cuse import DOF_CHUNK, CuseDevice, devname_for
from dtprobed.device.request import HelperRequest, Reply
from tests.device.fake_cuse import served_device
from tests.device.fake_kernel import FakeCuseKernel, FakeMemory, IoctlTrace
from tests.device.test_fuse_device import Recorder

HELPER_AT = 0x7F0000001000
DOF_AT = 0x7F0000100000


def dof_of_size(size: int) -> bytes:
    """A DOF whose dofh_loadsz is exactly *size* (header patched, padding appended)."""
    base = bytearray(build_dof([ProviderSpec("prov", [ProbeSpec("f", "p", [1])])]).data)
    base = base[:size] + bytes(max(0, size - len(base)))  # the device never looks past the header
    base[40:48] = size.to_bytes(8, "little")
    return bytes(base)


@dataclass
class Rig:
    kernel: FakeCuseKernel
    dev: CuseDevice
    recorder: Recorder

    def client(self, dof: bytes, *, helper_at: int = HELPER_AT, dof_at: int = DOF_AT) -> FakeMemory:
        mem = FakeMemory()
        mem.map(dof_at, dof)
        mem.map(helper_at, build_helper(b"a.out", 0, dof_at))
        return mem


@contextmanager
def make_rig(**options: Any) -> Iterator[Rig]:
    """A CUSE device served beside a fake kernel; *options* go to ``CuseDevice.serve_fd``."""
    recorder = Recorder(result=11)
    with served_device(recorder, **options) as (kernel, dev, info):
        assert info == {"DEVNAME": "dtrace/helper"} and kernel.unrestricted
        yield Rig(kernel, dev, recorder)


@pytest.fixture
def rig() -> Iterator[Rig]:
    with make_rig() as rig:
        yield rig


def test_devname_for() -> None:
    assert devname_for("/dev/dtrace/helper") == "dtrace/helper"
    assert devname_for("/tmp/helper") is None
    assert devname_for("/dev/") is None


def test_open_and_flush_are_enosys_release_is_answered(rig: Rig) -> None:
    # ENOSYS: the kernel stops sending OPEN, FLUSH and RELEASE (fc->no_open, no_flush)
    assert rig.kernel.open(pid=100) == errno.ENOSYS
    assert rig.kernel.flush(pid=100) == errno.ENOSYS
    rig.kernel.release(pid=100, fh=0)  # a kernel that sends it anyway gets an answer


@pytest.mark.parametrize("size", [64, 65535, 65536, 65537, 65600, 131137])
def test_adddof_chunking(rig: Rig, size: int) -> None:
    dof = dof_of_size(size)
    trace = IoctlTrace()
    result = rig.kernel.ioctl(100, DTRACEHIOC_ADDDOF, HELPER_AT, rig.client(dof), trace=trace)
    assert result == 11
    [req] = rig.recorder.requests
    assert (req.tid, req.kind, req.dof, req.gen) == (100, "adddof", dof, -1)
    assert req.helper == build_helper(b"a.out", 0, DOF_AT)
    asked = [iov for retry in trace.retries for iov in retry]
    assert asked[:2] == [(HELPER_AT, 80), (DOF_AT, 64)]
    assert all(length <= DOF_CHUNK for _, length in asked)
    data = asked[2:]
    assert sum(length for _, length in data) == size - 64
    assert [base for base, _ in data] == [DOF_AT + 64 + i * DOF_CHUNK for i in range(len(data))]
    assert trace.messages == 3 + math.ceil((size - 64) / DOF_CHUNK)
    assert rig.dev.sequences_in_flight() == 0


def test_many_probes_dof(rig: Rig) -> None:
    dof = many_probes_dof(2000).data
    assert len(dof) > 200 * 1024
    assert rig.kernel.ioctl(7, DTRACEHIOC_ADDDOF, HELPER_AT, rig.client(dof)) == 11
    assert rig.recorder.requests[0].dof == dof


def test_interleaved_callers(rig: Rig) -> None:
    """Two threads (same process or not: keyed by thread id) mid-sequence at once."""
    dof_a, dof_b = dof_of_size(70000), dof_of_size(140000)
    mem_a = rig.client(dof_a)
    mem_b = rig.client(dof_b, helper_at=HELPER_AT + 0x1000, dof_at=DOF_AT + 0x100000)
    a = rig.kernel.ioctl_steps(201, DTRACEHIOC_ADDDOF, HELPER_AT, mem_a)
    b = rig.kernel.ioctl_steps(202, DTRACEHIOC_ADDDOF, HELPER_AT + 0x1000, mem_b)
    results: dict[str, int] = {}
    live = {"a": a, "b": b}
    while live:
        for name, steps in list(live.items()):
            try:
                next(steps)
            except StopIteration as stop:
                results[name] = stop.value
                del live[name]
    assert results == {"a": 11, "b": 11}
    got = {r.tid: r.dof for r in rig.recorder.requests}
    assert got == {201: dof_a, 202: dof_b}


def test_caller_vanishing_mid_sequence_then_same_tid_starts_clean(rig: Rig) -> None:
    steps = rig.kernel.ioctl_steps(
        300, DTRACEHIOC_ADDDOF, HELPER_AT, rig.client(dof_of_size(100000))
    )
    next(steps)
    next(steps)  # helper and header fetched; the caller "dies" here
    assert rig.dev.sequences_in_flight() == 1
    dof = dof_of_size(5000)
    assert rig.kernel.ioctl(300, DTRACEHIOC_ADDDOF, HELPER_AT, rig.client(dof)) == 11
    assert [r.dof for r in rig.recorder.requests] == [dof]
    assert rig.dev.sequences_in_flight() == 0


def test_client_memory_fault_mid_sequence(rig: Rig) -> None:
    """loadsz larger than what the client mapped: the kernel fails the client with EFAULT."""
    dof = dof_of_size(100000)
    mem = FakeMemory()
    mem.map(DOF_AT, dof[:70000])
    mem.map(HELPER_AT, build_helper(b"a.out", 0, DOF_AT))
    assert rig.kernel.ioctl(301, DTRACEHIOC_ADDDOF, HELPER_AT, mem) == -errno.EFAULT
    assert rig.recorder.requests == []
    assert rig.kernel.ioctl(301, DTRACEHIOC_ADDDOF, HELPER_AT, rig.client(dof)) == 11


@pytest.mark.parametrize(
    ("round_", "change"),
    [
        (1, lambda d: d[:79]),  # short helper
        (1, lambda d: d + b"\0"),  # long helper
        (2, lambda d: d[:63]),  # short header
        (3, lambda d: d[:-1]),  # short data chunk
        (3, lambda d: d + d[:8]),  # long data chunk
    ],
)
def test_bad_retry_sizes_are_einval_and_drop_state(rig: Rig, round_: int, change: object) -> None:
    def tamper(r: int, data: bytes) -> bytes:
        return change(data) if r == round_ else data  # type: ignore[operator]

    mem = rig.client(dof_of_size(70000))
    result = rig.kernel.ioctl(400, DTRACEHIOC_ADDDOF, HELPER_AT, mem, tamper=tamper)
    assert result == -errno.EINVAL
    assert rig.recorder.requests == []
    assert rig.dev.sequences_in_flight() == 0


def test_data_without_a_sequence_is_einval(rig: Rig) -> None:
    mem = rig.client(dof_of_size(100))
    result = rig.kernel.ioctl(
        401, DTRACEHIOC_ADDDOF, HELPER_AT, mem, tamper=lambda r, d: d or b"x" * 80
    )
    assert result == -errno.EINVAL


def test_loadsz_over_limit_is_einval(rig: Rig) -> None:
    rig.dev.max_dof_size = 4096
    mem = rig.client(dof_of_size(4097))
    assert rig.kernel.ioctl(402, DTRACEHIOC_ADDDOF, HELPER_AT, mem) == -errno.EINVAL
    assert rig.recorder.requests == [] and rig.dev.sequences_in_flight() == 0


def test_loadsz_below_header_is_einval(rig: Rig) -> None:
    dof = bytearray(dof_of_size(100))
    dof[40:48] = (63).to_bytes(8, "little")
    assert (
        rig.kernel.ioctl(403, DTRACEHIOC_ADDDOF, HELPER_AT, rig.client(bytes(dof))) == -errno.EINVAL
    )


def test_remove_passes_generation_by_value(rig: Rig) -> None:
    rig.recorder.result = 0
    assert rig.kernel.ioctl(500, DTRACEHIOC_REMOVE, 42, FakeMemory()) == 0
    [req] = rig.recorder.requests
    assert (req.tid, req.kind, req.gen, req.helper, req.dof) == (500, "remove", 42, b"", b"")


def test_remove_generation_is_a_c_int(rig: Rig) -> None:
    """REMOVE(-1) (every dtrace 2.0.7 program whose registration failed sends it at exit)
    arrives as arg 0xffffffff: it is the int -1, not 4294967295; so is the 64-bit form."""
    rig.recorder.result = 0
    assert rig.kernel.ioctl(502, DTRACEHIOC_REMOVE, 0xFFFFFFFF, FakeMemory()) == 0
    assert rig.kernel.ioctl(502, DTRACEHIOC_REMOVE, 0xFFFFFFFFFFFFFFFF, FakeMemory()) == 0
    assert rig.kernel.ioctl(502, DTRACEHIOC_REMOVE, 0x7FFFFFFF, FakeMemory()) == 0
    remove_64 = DTRACEHIOC_REMOVE & ~(0x3FFF << 16) | (8 << 16)  # _IOW(0xd8, 2, long)
    assert rig.kernel.ioctl(502, remove_64, 5, FakeMemory()) == 0
    assert [(r.kind, r.gen) for r in rig.recorder.requests] == [
        ("remove", -1),
        ("remove", -1),
        ("remove", 0x7FFFFFFF),
        ("remove", 5),
    ]


@pytest.mark.parametrize("cmd", [DTRACEHIOC_HASUSDT, DTRACEHIOC_HASUSDT_32])
def test_hasusdt_passes_the_address_by_value(rig: Rig, cmd: int) -> None:
    """HASUSDT (dtrace >= 2.0.3): the address arrives in arg, no retry, handler sees it."""
    rig.recorder.result = 3
    address = 0x5555_5555_9199 if cmd == DTRACEHIOC_HASUSDT else 0x0804_9199
    trace = IoctlTrace()
    assert rig.kernel.ioctl(503, cmd, address, FakeMemory(), trace=trace) == 3
    assert trace.retries == [] and trace.messages == 1
    [req] = rig.recorder.requests
    assert (req.tid, req.kind, req.address, req.gen, req.helper, req.dof) == (
        503,
        "hasusdt",
        address,
        -1,
        b"",
        b"",
    )
    assert rig.dev.sequences_in_flight() == 0


def test_hasusdt_refused_by_the_handler_is_einval(rig: Rig) -> None:
    """A handler that does not know the kind answers EINVAL; the device goes on serving."""

    def refuse(req: HelperRequest, reply: Reply) -> None:
        rig.recorder.requests.append(req)
        if req.kind not in ("adddof", "remove"):
            raise RequestRejected(errno.EINVAL, f"{req.kind} is not supported")
        reply(11)

    rig.dev._handler = refuse
    assert rig.kernel.ioctl(504, DTRACEHIOC_HASUSDT, 0x401000, FakeMemory()) == -errno.EINVAL
    mem = rig.client(dof_of_size(100))
    assert rig.kernel.ioctl(504, DTRACEHIOC_ADDDOF, HELPER_AT, mem) == 11


@pytest.mark.parametrize(
    "cmd",
    [
        0x4008D899,  # unknown number
        DTRACEHIOC_ADD,  # legacy ADD: not handled (upstream neither)
        0x8008D804,  # HASUSDT's number with _IOC_READ
        0x4010D804,  # HASUSDT with a size that is neither 4 nor 8
        0x4008D904,  # another type
        DTRACEHIOC_ADDDOF & ~(0x3FFF << 16) | (40 << 16),  # ADDDOF with a wrong size
    ],
)
def test_unknown_ioctl_is_einval(rig: Rig, cmd: int) -> None:
    assert rig.kernel.ioctl(501, cmd, 0, FakeMemory()) == -errno.EINVAL
    assert rig.recorder.requests == []


def test_handler_may_reply_later_from_another_thread(rig: Rig) -> None:
    rig.recorder.hold = True

    def answer_late() -> None:
        assert rig.recorder.called.wait(5)
        rig.recorder.held.pop()(99)

    replier = threading.Thread(target=answer_late)
    replier.start()
    mem = rig.client(dof_of_size(100))
    assert rig.kernel.ioctl(600, DTRACEHIOC_ADDDOF, HELPER_AT, mem) == 99
    replier.join(5)


class FakeClock:
    """The device's time source, moved by the test (no sleeping, no timing)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def abandon_after_header(rig: Rig, tid: int, dof: bytes, slot: int) -> None:
    """Start an ADDDOF and stop after the header is in (the client then "dies")."""
    helper_at, dof_at = HELPER_AT + slot * 0x1000, DOF_AT + slot * 0x100_0000
    mem = rig.client(dof, helper_at=helper_at, dof_at=dof_at)
    steps = rig.kernel.ioctl_steps(tid, DTRACEHIOC_ADDDOF, helper_at, mem)
    next(steps)  # helper asked for
    next(steps)  # header asked for
    next(steps)  # header in: its loadsz is reserved, the first chunk asked for
    steps.close()


#: What a sequence abandoned right after its header holds: the header and the first
#: chunk it asked for (never the size the header claims).
HELD_AFTER_HEADER = 64 + 64 * 1024


def test_partly_fetched_sequences_are_bounded_per_uid() -> None:
    """Abandoned sequences cost what they hold, and fill only their own uid's share.

    Before: a header's ``dofh_loadsz`` was reserved in one global bound, so four
    abandoned headers claiming 256 KiB filled a 1 MiB bound and every other
    caller's registration was refused (and a 256 MiB claim cost 256 MiB)."""
    limit, per_uid, size = 1 << 20, 4 * HELD_AFTER_HEADER, 256 << 10
    with make_rig(max_pending_bytes=limit, max_pending_per_uid=per_uid, clock=FakeClock()) as rig:
        dof = dof_of_size(size)
        for i in range(64):
            rig.kernel.uids[1000 + i] = 1234  # one hostile uid, many threads
        for i in range(4):
            abandon_after_header(rig, 1000 + i, dof, i)
        assert rig.dev.sequences_in_flight() == 4
        assert rig.dev.pending_bytes() == rig.dev.pending_bytes(1234) == 4 * HELD_AFTER_HEADER
        refused = []
        for i in range(4, 64):
            mem = rig.client(dof, helper_at=HELPER_AT + i * 0x1000, dof_at=DOF_AT + i * 0x100_0000)
            refused.append(
                rig.kernel.ioctl(1000 + i, DTRACEHIOC_ADDDOF, HELPER_AT + i * 0x1000, mem)
            )
        assert refused == [-errno.EINVAL] * 60
        assert rig.dev.pending_bytes(1234) <= per_uid
        # Another uid is not refused for it: a small DOF and a large one get through.
        rig.kernel.uids[2000] = rig.kernel.uids[2001] = 4321
        small = dof_of_size(100)
        assert rig.kernel.ioctl(2000, DTRACEHIOC_ADDDOF, HELPER_AT, rig.client(small)) == 11
        big = rig.client(dof, helper_at=HELPER_AT + 0x80000, dof_at=DOF_AT + 0x7000_0000)
        assert rig.kernel.ioctl(2001, DTRACEHIOC_ADDDOF, HELPER_AT + 0x80000, big) == 11
        assert [len(r.dof) for r in rig.recorder.requests] == [100, size]
        assert [r.uid for r in rig.recorder.requests] == [4321, 4321]
        assert rig.dev.pending_bytes(4321) == 0


def test_abandoned_sequences_expire() -> None:
    clock = FakeClock()
    size = 256 << 10
    limit = 4 * HELD_AFTER_HEADER + 1000 + 4096  # full: a fifth 256 KiB header won't fit
    with make_rig(max_pending_bytes=limit, sequence_expiry=30.0, clock=clock) as rig:
        dof = dof_of_size(size)
        for i in range(4):
            abandon_after_header(rig, 3000 + i, dof, i)
        clock.now += 20
        abandon_after_header(rig, 3010, dof_of_size(1000), 9)  # younger: must survive
        assert rig.dev.pending_bytes() == 4 * HELD_AFTER_HEADER + 1000
        clock.now += 10.5  # the first four are idle for 30.5 s, the fifth for 10.5 s
        # The bound is full; the next header expires the stale ones and fits.
        mem = rig.client(dof, helper_at=HELPER_AT + 0x20000, dof_at=DOF_AT + 0x2000_0000)
        assert rig.kernel.ioctl(3020, DTRACEHIOC_ADDDOF, HELPER_AT + 0x20000, mem) == 11
        assert [r.tid for r in rig.recorder.requests] == [3020]
        assert rig.dev.sequences_in_flight() == 1  # only the young one is left
        assert rig.dev.pending_bytes() == 1000
        clock.now += 31
        assert rig.kernel.ioctl(3021, DTRACEHIOC_REMOVE, 1, FakeMemory()) == 11
        assert rig.dev.sequences_in_flight() == 0 and rig.dev.pending_bytes() == 0


def test_retry_after_expiry_is_einval() -> None:
    """The kernel re-sending a sequence we dropped: data without a request in progress."""
    clock = FakeClock()
    with make_rig(sequence_expiry=30.0, clock=clock) as rig:
        mem = rig.client(dof_of_size(200000))
        steps = rig.kernel.ioctl_steps(4000, DTRACEHIOC_ADDDOF, HELPER_AT, mem)
        next(steps)
        next(steps)
        clock.now += 31
        rig.kernel.ioctl(4001, DTRACEHIOC_REMOVE, 1, FakeMemory())  # any ioctl start expires
        assert rig.dev.sequences_in_flight() == 0
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                assert stop.value == -errno.EINVAL
                break
        assert [r.kind for r in rig.recorder.requests] == ["remove"]


def test_ended_sequences_give_their_bytes_back(rig: Rig) -> None:
    """Completed, refused and replaced sequences release their reservation."""
    assert (
        rig.kernel.ioctl(5000, DTRACEHIOC_ADDDOF, HELPER_AT, rig.client(dof_of_size(70000))) == 11
    )
    mem = rig.client(dof_of_size(70000))
    assert (
        rig.kernel.ioctl(
            5001, DTRACEHIOC_ADDDOF, HELPER_AT, mem, tamper=lambda r, d: d[:-1] if r == 3 else d
        )
        == -errno.EINVAL
    )
    abandon_after_header(rig, 5002, dof_of_size(90000), 1)
    assert rig.dev.pending_bytes() == HELD_AFTER_HEADER
    assert rig.kernel.ioctl(5002, DTRACEHIOC_ADDDOF, HELPER_AT, rig.client(dof_of_size(100))) == 11
    assert rig.dev.pending_bytes() == 0 and rig.dev.sequences_in_flight() == 0
