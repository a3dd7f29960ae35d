"""CUSE mode against the fake kernel: CUSE_INIT, the ioctl-retry sequence, chunking, interleaving."""

from __future__ import annotations

import errno
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper, many_probes_dof
from common.ioctl import DTRACEHIOC_ADDDOF, DTRACEHIOC_REMOVE
from dtprobed.device.cuse import DOF_CHUNK, CuseDevice, devname_for
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


@pytest.fixture
def rig() -> Iterator[Rig]:
    kernel = FakeCuseKernel()
    recorder = Recorder(result=11)
    fd = kernel.daemon_fd()
    holder: dict[str, CuseDevice] = {}
    # The handshake blocks until CUSE_INIT arrives: run it beside the fake kernel.
    starter = threading.Thread(
        target=lambda: holder.setdefault(
            "dev",
            CuseDevice.serve_fd(fd, "dtrace/helper", recorder, max_dof_size=1 << 20, log=None),
        )
    )
    starter.start()
    info = kernel.cuse_init()
    starter.join(5)
    dev = holder["dev"]
    assert info == {"DEVNAME": "dtrace/helper"} and kernel.unrestricted
    stop = threading.Event()
    thread = threading.Thread(target=dev.run, args=(stop,), kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Rig(kernel, dev, recorder)
    finally:
        stop.set()
        thread.join(5)
        dev.close()
        kernel.close()


def test_devname_for() -> None:
    assert devname_for("/dev/dtrace/helper") == "dtrace/helper"
    assert devname_for("/tmp/helper") is None
    assert devname_for("/dev/") is None


def test_open_and_release(rig: Rig) -> None:
    fh = rig.kernel.open(pid=100)
    rig.kernel.release(pid=100, fh=fh)


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


def test_unknown_ioctl_is_einval(rig: Rig) -> None:
    assert rig.kernel.ioctl(501, 0x4008D899, 0, FakeMemory()) == -errno.EINVAL
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
