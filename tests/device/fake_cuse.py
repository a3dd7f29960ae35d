"""Our real CUSE device served over the fake kernel (:mod:`tests.device.fake_kernel`).

One way to do the CUSE_INIT handshake and the serving thread, for every test that
drives the device, or the whole receiver behind it, from the kernel's side; and one
way to build that receiver in the test's process (real children, real exit watcher).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.limits import ParseLimits
from dtprobed.children.parser import ParserChild
from dtprobed.children.writer import StashWriterChild
from dtprobed.daemon.exitwatch import ExitWatcher
from dtprobed.daemon.receiver import Receiver
from dtprobed.device.cuse import CuseDevice
from dtprobed.device.request import Handler
from tests.device.fake_kernel import FakeCuseKernel


@contextmanager
def served_device(
    handler: Handler, **options: Any
) -> Iterator[tuple[FakeCuseKernel, CuseDevice, dict[str, str]]]:
    """Serve ``dtrace/helper`` with *handler*; yields the kernel, the device, CUSE_INIT's info.

    *options* go to :meth:`CuseDevice.serve_fd`.  On exit the serving thread is
    stopped, then the device and the kernel are closed.
    """
    kernel = FakeCuseKernel()
    fd = kernel.daemon_fd()
    devs: list[CuseDevice] = []
    # The handshake blocks until CUSE_INIT arrives: run it beside the fake kernel.
    starter = threading.Thread(
        target=lambda: devs.append(
            CuseDevice.serve_fd(
                fd, "dtrace/helper", handler, max_dof_size=1 << 20, log=None, **options
            )
        )
    )
    starter.start()
    info = kernel.cuse_init()
    starter.join(5)
    if not devs:
        kernel.close()
        raise AssertionError("the CUSE handshake did not complete")
    [dev] = devs
    stop = threading.Event()
    server = threading.Thread(target=dev.run, args=(stop,), kwargs={"poll_interval": 0.05})
    server.start()
    try:
        yield kernel, dev, info
    finally:
        stop.set()
        server.join(5)
        dev.close()
        kernel.close()


@contextmanager
def in_process_receiver(state_dir: Path) -> Iterator[tuple[Receiver, StashWriterChild]]:
    """The daemon's receiver with its real children and exit watcher, in this process.

    Stopped on exit in the daemon's order: the receiver, the watcher, the children.
    """
    limits = ParseLimits()
    writer = StashWriterChild(str(state_dir), timeout=30.0, log=logging.getLogger("t.stash"))
    small = ParserChild(limits=limits, timeout=30.0, log=logging.getLogger("t.parser"))
    large = ParserChild(limits=limits, timeout=30.0, log=logging.getLogger("t.parser"))
    holder: dict[str, Receiver] = {}
    watcher = ExitWatcher(lambda pid: holder["receiver"].prune_exited(pid))
    writer.start()
    small.start()
    receiver = holder["receiver"] = Receiver(
        small_parser=small,
        large_parser=large,
        writer=writer,
        watcher=watcher,
        on_fatal=lambda status, reason: None,
    )
    watcher.start()
    try:
        yield receiver, writer
    finally:
        receiver.close()
        watcher.stop()
        small.stop()
        large.stop()
        writer.stop()
