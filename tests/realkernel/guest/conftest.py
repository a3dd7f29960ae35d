"""The in-VM half of the real-kernel suite: collected only inside the CUSE VM.

tests/realkernel/test_in_vm.py boots the VM and runs this folder there with
``DTPROBED_IN_VM=1``; a plain host run of the suite doesn't collect these tests at
all (they need /dev/cuse and a kernel with CUSE), so nothing here is skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realkernel.harness import (
    ClientKind,
    PrivateDaemon,
    build_c_client,
    client_kinds,
    private_device,
)

IN_VM = os.environ.get("DTPROBED_IN_VM") == "1"
collect_ignore_glob = [] if IN_VM else ["*"]


@pytest.fixture(scope="session")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ClientKind]:
    return client_kinds(build_c_client(tmp_path_factory.mktemp("client")))


def start_daemon(tmp: Path, mode: str, device_mode: str | None = None) -> PrivateDaemon:
    state = tmp / "state"
    state.mkdir()
    daemon = PrivateDaemon(
        private_device(mode, tmp), state, device_mode or mode, tmp / "dtprobed.log"
    )
    daemon.start()
    return daemon


@pytest.fixture(scope="module")
def cuse_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDaemon]:
    tmp = tmp_path_factory.mktemp("cuse")
    daemon = start_daemon(tmp, "cuse")
    try:
        yield daemon
    finally:
        if daemon.proc is not None:
            daemon.stop(signal.SIGTERM)
        daemon.cleanup()
        print(daemon.log()[-4000:])
        shutil.rmtree(tmp / "state", ignore_errors=True)
