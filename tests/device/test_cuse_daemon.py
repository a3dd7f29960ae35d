"""CUSE mode with the daemon's real receiver, sandboxed parsers and stash writer.

The fake kernel (:mod:`tests.device.fake_kernel`) plays CUSE; the caller is
this test process itself: its DOF lies in a real file mapping of ours
(``PROT_READ|PROT_EXEC``, the tracepoints in the same mapping), and the fake
kernel hands the daemon the same bytes the mapping holds, with our thread id
in ``fuse_in_header.pid`` — so identity, the tracepoint check and the stash
all see a real process.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper
from common.ioctl import DTRACEHIOC_ADDDOF, DTRACEHIOC_HASUSDT, DTRACEHIOC_REMOVE
from dtprobed.children.writer import StashWriterChild
from dtprobed.device.cuse import CuseDevice
from tests.device.fake_cuse import in_process_receiver, served_device
from tests.device.fake_kernel import FakeCuseKernel, FakeMemory
from tests.support.client import map_file

MAPPING_SIZE = 1 << 16
HELPER_AT = 0x7F00_0000_1000  # the fake kernel's copy: only ever read through it


@dataclass
class Stack:
    kernel: FakeCuseKernel
    dev: CuseDevice
    writer: StashWriterChild
    state_dir: Path
    dof_at: int
    memory: FakeMemory

    def tid(self) -> int:
        return threading.get_native_id()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    # Our "object": one file, mapped executable; the DOF at its start, the
    # tracepoints further in — the same (dev, ino), as an ELF object's would be.
    obj = tmp_path / "object.bin"
    obj.write_bytes(bytes(MAPPING_SIZE))
    base = map_file(str(obj), MAPPING_SIZE, mmap.PROT_READ | mmap.PROT_EXEC)
    probe = ProbeSpec("main", "go", offsets=[0x10], addr=base + 0x8000)
    dof = build_dof([ProviderSpec("cuseprov", [probe])]).data
    with open(obj, "r+b") as f:  # the private mapping shows it (page cache, never written)
        f.write(dof)
    memory = FakeMemory()
    memory.map(base, dof)
    memory.map(HELPER_AT, build_helper(b"object.bin", 0, base))

    state_dir = tmp_path / "run"
    state_dir.mkdir()
    with (
        in_process_receiver(state_dir) as (receiver, writer),
        served_device(receiver.handle) as (kernel, dev, _info),
    ):
        yield Stack(kernel, dev, writer, state_dir, base, memory)


def registered_gens(stack: Stack) -> list[str]:
    d = stack.state_dir / "stash" / "dof-pid" / str(os.getpid())
    return sorted(p.name for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_remove_minus_one_answers_zero_and_keeps_the_writer(stack: Stack) -> None:
    """Issue 9: REMOVE(-1) arrives as u32 0xffffffff; it used to reach the writer as
    4294967295, fail its int bound and make it exit (the next request waited for a new
    writer).  Now: 0 at once, the same writer serves the next registration."""
    writer_pid = stack.writer.pid
    assert writer_pid is not None
    for arg in (0xFFFFFFFF, 0xFFFFFFFF_FFFFFFFF, 0x8000_0000):
        assert stack.kernel.ioctl(stack.tid(), DTRACEHIOC_REMOVE, arg, FakeMemory()) == 0
    assert stack.writer.pid == writer_pid
    gen = stack.kernel.ioctl(stack.tid(), DTRACEHIOC_ADDDOF, HELPER_AT, stack.memory)
    assert gen == 0
    assert stack.writer.pid == writer_pid, "the registration needed a new stash writer"
    assert registered_gens(stack) == ["0"]
    # An unknown in-range generation is 0 too, and removes nothing.
    assert stack.kernel.ioctl(stack.tid(), DTRACEHIOC_REMOVE, 7, FakeMemory()) == 0
    assert registered_gens(stack) == ["0"]
    assert stack.kernel.ioctl(stack.tid(), DTRACEHIOC_REMOVE, gen, FakeMemory()) == 0
    assert registered_gens(stack) == []
    assert stack.writer.pid == writer_pid


def test_hasusdt_reaches_the_receiver_and_nothing_breaks(stack: Stack) -> None:
    """HASUSDT of an address in our object (which has no .note.usdt): EINVAL, and the
    daemon's children are unharmed (a HASUSDT once went down the REMOVE path)."""
    writer_pid = stack.writer.pid
    result = stack.kernel.ioctl(
        stack.tid(), DTRACEHIOC_HASUSDT, stack.dof_at + 0x8000, FakeMemory()
    )
    assert result == -errno.EINVAL
    assert stack.writer.pid == writer_pid
    assert registered_gens(stack) == []
    assert stack.kernel.ioctl(stack.tid(), DTRACEHIOC_ADDDOF, HELPER_AT, stack.memory) == 0
    assert stack.writer.pid == writer_pid


def test_remove_logs_removed_only_when_a_generation_went(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """REMOVE of an unknown generation answers 0 (upstream) but says so at DEBUG only;
    "removed generation N" is written when generation N existed."""
    caplog.set_level(logging.DEBUG, logger="dtprobed")
    gen = stack.kernel.ioctl(stack.tid(), DTRACEHIOC_ADDDOF, HELPER_AT, stack.memory)
    assert gen == 0
    pid = os.getpid()
    assert stack.kernel.ioctl(stack.tid(), DTRACEHIOC_REMOVE, 7, FakeMemory()) == 0
    assert stack.kernel.ioctl(stack.tid(), DTRACEHIOC_REMOVE, gen, FakeMemory()) == 0

    def lines() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "dtprobed"]

    # the receiver answers first and logs afterwards: wait for the second REMOVE's line
    deadline = time.monotonic() + 30
    while (logging.INFO, f"{pid}: removed generation 0") not in lines():
        assert time.monotonic() < deadline, lines()
        time.sleep(0.01)
    seen = lines()
    assert (logging.DEBUG, f"{pid}: REMOVE of unknown generation 7") in seen
    assert not any(m == f"{pid}: removed generation 7" for _, m in seen)
