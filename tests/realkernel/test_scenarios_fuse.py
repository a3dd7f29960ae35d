"""The shared helper-device scenarios in FUSE-file mode, on the host (fast, no VM).

The same functions run in CUSE mode inside the VM (guest/test_cuse.py), so the
two modes are held to one set of expectations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.realkernel.harness import (
    ClientKind,
    PrivateDaemon,
    build_c_client,
    client_kinds,
    have_gcc,
    private_device,
)
from tests.support.scenarios import SCENARIOS, ScenarioEnv, scenario_auto_mode


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ClientKind]:
    assert have_gcc(), "gcc is needed to build tests/realkernel/client.c"
    return client_kinds(build_c_client(tmp_path_factory.mktemp("client")))


def started(tmp: Path, device_mode: str) -> PrivateDaemon:
    state = tmp / "state"
    state.mkdir()
    daemon = PrivateDaemon(private_device("fuse", tmp), state, device_mode, tmp / "dtprobed.log")
    daemon.start()
    return daemon


@pytest.fixture(scope="module")
def fuse_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDaemon]:
    daemon = started(tmp_path_factory.mktemp("fuse"), "fuse")
    try:
        yield daemon
    finally:
        if daemon.proc is not None:
            daemon.stop()
        daemon.cleanup()


@pytest.fixture
def env(fuse_daemon: PrivateDaemon, tmp_path: Path) -> Iterator[ScenarioEnv]:
    scenario_env = ScenarioEnv(fuse_daemon, tmp_path)
    try:
        yield scenario_env
    finally:
        scenario_env.close()
        if fuse_daemon.proc is None:
            fuse_daemon.start()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind_name", ["c", "python"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fuse(
    scenario: str, kind_name: str, env: ScenarioEnv, kinds: dict[str, ClientKind]
) -> None:
    assert env.mode == "fuse"
    run: Callable[[ScenarioEnv, ClientKind], None] = SCENARIOS[scenario]
    run(env, kinds[kind_name])


@pytest.mark.timeout(120)
def test_auto_mode_picks_fuse_on_a_non_dev_path(
    tmp_path: Path, kinds: dict[str, ClientKind]
) -> None:
    # "auto" with a path outside /dev means FUSE (design.md), whatever the kernel has.
    daemon = started(tmp_path, "auto")
    scenario_env = ScenarioEnv(daemon, tmp_path)
    try:
        scenario_auto_mode(scenario_env, kinds["c"], expected="fuse")
    finally:
        scenario_env.close()
        if daemon.proc is not None:
            assert daemon.stop() == 0
        daemon.cleanup()
