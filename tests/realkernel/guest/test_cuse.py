"""Every shared scenario in CUSE mode on a real kernel, with the C and the Python client."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.realkernel.guest.conftest import start_daemon
from tests.realkernel.harness import ClientKind, PrivateDaemon
from tests.support.scenarios import SCENARIOS, ScenarioEnv, scenario_auto_mode


@pytest.fixture
def env(cuse_daemon: PrivateDaemon, tmp_path: Path) -> Iterator[ScenarioEnv]:
    scenario_env = ScenarioEnv(cuse_daemon, tmp_path)
    try:
        yield scenario_env
    finally:
        scenario_env.close()
        if cuse_daemon.proc is None:  # a failed restart scenario: serve the next test
            cuse_daemon.start()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind_name", ["c", "python"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_cuse(
    scenario: str, kind_name: str, env: ScenarioEnv, kinds: dict[str, ClientKind]
) -> None:
    assert env.mode == "cuse"
    run: Callable[[ScenarioEnv, ClientKind], None] = SCENARIOS[scenario]
    run(env, kinds[kind_name])


@pytest.mark.timeout(300)
def test_auto_mode_picks_cuse(tmp_path: Path, kinds: dict[str, ClientKind]) -> None:
    assert os.path.exists("/dev/cuse")
    daemon = start_daemon(tmp_path, "cuse", device_mode="auto")
    scenario_env = ScenarioEnv(daemon, tmp_path)
    try:
        scenario_auto_mode(scenario_env, kinds["c"], expected="cuse")
        assert "(cuse mode)" in daemon.log()
    finally:
        scenario_env.close()
        if daemon.proc is not None:
            assert daemon.stop() == 0
        daemon.cleanup()
