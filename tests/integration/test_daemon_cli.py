"""The ``dtprobed`` command: options, exit statuses, signals, sd_notify, mount namespaces."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.clients import Clients, code_dof, write_dof
from tests.support.daemon import REPO, DaemonFactory, DaemonHandle, mounted
from tests.support.stash_view import snapshot

pytestmark = pytest.mark.timeout(120)


def _dtprobed(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dtprobed", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["-t", "0"], "timeout must be a positive number, not 0"),
        (["-t", "soon"], "timeout must be a positive number, not soon"),
        (["-n", "x/y", "--device", "/tmp/z"], "mutually exclusive"),
        (["--device", "relative/path"], "needs an absolute path"),
        (["--device-mode", "cuse", "--device", "/tmp/helper"], "CUSE mode needs a device path"),
        (["--device-mode", "sideways"], "invalid choice"),
        (["--max-probes", "0"], "expected a positive integer"),
        (["stray"], "unrecognized arguments: stray"),
    ],
)
def test_bad_options_exit_1_with_one_line(args: list[str], message: str) -> None:
    result = _dtprobed(*args)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dtprobed: error: ") and message in lines[0]


def test_help_and_version() -> None:
    assert _dtprobed("--version").stdout.startswith("dtprobed ")
    help_text = _dtprobed("--help").stdout
    for option in ("-F", "-d", "-n", "-s", "-t", "--device", "--device-mode", "--no-sandbox"):
        assert option in help_text


def test_cuse_mode_without_cuse_is_fatal(tmp_path: Path) -> None:
    if os.path.exists("/dev/cuse"):
        pytest.skip("this kernel has /dev/cuse")  # the real-CUSE VM suite covers it
    result = _dtprobed(
        "-F", "--device-mode", "cuse", "-n", f"dtrace-test-{os.getpid()}", "-s", str(tmp_path)
    )
    assert result.returncode == 1
    assert "cuse" in result.stderr.lower()
    assert list(tmp_path.iterdir()) == []  # the stash was not touched


def test_daemon_leaves_its_start_directory(daemon: DaemonHandle) -> None:
    # started from the repository (tests/support/daemon.py runs it with cwd=REPO)
    assert os.readlink(f"/proc/{daemon.proc.pid}/cwd") == "/"


def test_device_already_served_is_fatal(daemon: DaemonHandle, tmp_path: Path) -> None:
    before = snapshot(daemon.state_dir)
    result = _dtprobed(
        "-F",
        "--device-mode",
        "fuse",
        "--device",
        str(daemon.device),
        "-s",
        str(tmp_path / "other-state"),
    )
    assert result.returncode == 1, result.stderr
    assert str(daemon.device) in result.stderr
    assert mounted(daemon.device)  # the live daemon's mount is untouched
    assert snapshot(daemon.state_dir) == before


# SIGHUP no longer stops: it runs a catch-up (tests/integration/test_catchup.py)
@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_other_stop_signals_exit_cleanly(
    daemon_factory: DaemonFactory, loose_clients: Clients, tmp_path: Path, sig: int
) -> None:
    daemon = daemon_factory.start()
    client = loose_clients.start()
    assert client.register(write_dof(tmp_path, "s", code_dof().data))["gen"] == 0
    before = snapshot(daemon.state_dir)
    assert daemon.stop(sig) == 0
    assert not mounted(daemon.device)
    assert snapshot(daemon.state_dir) == before  # the stash survives a stop intact
    assert not daemon.session_alive()


def test_sigusr2_forces_a_reparse(daemon: DaemonHandle, clients: Clients, tmp_path: Path) -> None:
    client = clients.start()
    assert client.register(write_dof(tmp_path, "u", code_dof(nargs=1).data))["gen"] == 0
    probes = daemon.state_dir / "probes" / str(client.pid)
    before = {p: p.read_bytes() for p in probes.rglob("*") if p.is_file()}
    # damage the parsed files; a forced reparse must regenerate them
    for path in before:
        path.write_bytes(b"junk")
    os.kill(daemon.pid, signal.SIGUSR2)
    daemon.wait_for("the forced reparse", lambda: "reparse (forced)" in daemon.log_text())
    after = {p: p.read_bytes() for p in probes.rglob("*") if p.is_file()}
    assert after == before
    daemon.verify()


def test_sd_notify_ready_watchdog_stopping(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    try:
        daemon = daemon_factory.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
        seen: list[str] = []
        # start-up may feed the watchdog (and extend the start timeout) before READY=1
        while "READY=1" not in seen:
            seen += sock.recv(4096).decode().splitlines()
        assert set(seen) - {"READY=1"} <= {"WATCHDOG=1"} | {
            m for m in seen if m.startswith(("MAINPID=", "EXTEND_TIMEOUT_USEC="))
        }, seen
        after: list[str] = []
        while "WATCHDOG=1" not in after:  # the main loop feeds it once ready
            after += sock.recv(4096).decode().splitlines()
        assert daemon.stop() == 0
        rest: list[str] = []
        sock.settimeout(0.5)
        try:
            while True:
                rest += sock.recv(4096).decode().splitlines()
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
    finally:
        sock.close()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare(1) not installed")
def test_client_outside_the_daemons_mount_namespace(
    daemon_factory: DaemonFactory, loose_clients: Clients, tmp_path: Path
) -> None:
    # The situation of a systemd service with ProtectSystem= etc.: the daemon's mounts
    # are slaves of the host's, and a mount made inside would not reach the host.
    # The daemon mounts in the namespace of --mount-ns-pid (default 1, the host's); here
    # the test process plays the host (pid 1's namespace may be unreadable in a container).
    daemon = daemon_factory.start(
        wrap=["unshare", "-m", "--propagation", "slave"],
        extra_args=["--mount-ns-pid", str(os.getpid())],
    )
    own_ns = os.readlink(f"/proc/{daemon.pid}/ns/mnt")
    assert own_ns != os.readlink("/proc/self/ns/mnt")
    assert mounted(daemon.device), "the helper is not mounted in the test's namespace"
    client = loose_clients.start()
    assert client.register(write_dof(tmp_path, "ns", code_dof().data))["gen"] == 0
    daemon.verify()
