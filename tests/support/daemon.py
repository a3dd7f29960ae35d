"""A private ``dtprobed`` for tests: real daemon, real children, real kernel FUSE device.

:func:`start_daemon` runs ``python -m dtprobed`` in FUSE mode with a private
helper path and state directory under the test's ``tmp_path``, in its own
session, and returns once the daemon says it is ready (``--ready-fd``) —
failing at once if the daemon exits first.  :meth:`DaemonHandle.stop` sends
SIGTERM and requires a clean exit (status 0, mount gone, no process of its
session left); the failure path kills the session and detaches the mount.

The ``daemon`` fixture wraps this for the common case; other suites reuse it
with ``from tests.support.daemon import daemon  # noqa: F401`` in their
``conftest.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mounted(path: Path) -> bool:
    """Is *path* a mount point (per /proc/self/mountinfo)?"""
    target = os.fsencode(str(path))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            # field 5 is the mount point, octal-escaped
            point = fields[4].replace(b"\\040", b" ").replace(b"\\134", b"\\")
            if point == target:
                return True
    return False


def detach(path: Path) -> None:
    """Lazily unmount *path* (failure-path cleanup)."""
    _libc.umount2(os.fsencode(str(path)), MNT_DETACH)


def children_of(pid: int) -> list[int]:
    """Direct children of *pid*, from ``/proc/PID/task/*/children``."""
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


@dataclass
class DaemonHandle:
    """One running private daemon.  Properties are read-only views of its state."""

    proc: subprocess.Popen[bytes]
    device: Path
    state_dir: Path
    log_path: Path
    argv: list[str]
    _log_file: object = field(repr=False, default=None)
    stopped: bool = False

    __test__ = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> dict[str, list[int]]:
        """The daemon's children by role: ``parser`` and ``writer``."""
        roles: dict[str, list[int]] = {"parser": [], "writer": [], "other": []}
        for child in children_of(self.pid):
            argv = " ".join(cmdline(child))
            if "parserd" in argv:
                roles["parser"].append(child)
            elif "dtprobed.stash.writer" in argv:
                roles["writer"].append(child)
            else:
                roles["other"].append(child)
        return roles

    def writer_pid(self) -> int:
        pids = self.children()["writer"]
        assert len(pids) == 1, f"expected one stash writer, found {pids}"
        return pids[0]

    def stash_pids(self) -> list[int]:
        """Processes with registrations in the stash (``stash/dof-pid/$pid``)."""
        d = self.state_dir / "stash" / "dof-pid"
        if not d.exists():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())

    def probe_pids(self) -> list[int]:
        d = self.state_dir / "probes"
        if not d.exists():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())

    def stash_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dtprobed.cli.stash", "-s", str(self.state_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )

    def verify(self) -> None:
        """``dtprobed-stash verify`` must pass."""
        result = self.stash_cli("verify")
        assert result.returncode == 0, f"verify failed:\n{result.stdout}\n{result.stderr}"

    def stash_list(self) -> object:
        result = self.stash_cli("list", "--json")
        assert result.returncode in (0, 1), result.stderr
        return json.loads(result.stdout) if result.stdout.strip() else None

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll *predicate* until true; fail (with the log) if it isn't, or the daemon died."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"daemon exited ({self.proc.returncode}) waiting for {what}:\n"
                    + self.log_text()
                )
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; daemon log:\n" + self.log_text())
            time.sleep(0.01)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon, wait for it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            status = self.proc.wait(STOP_TIMEOUT)
        finally:
            self.stopped = True
            self._close_log()
        return status

    def kill(self) -> None:
        """SIGKILL the daemon alone (its children notice their pipes close)."""
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)
        self.stopped = True
        self._close_log()

    def _close_log(self) -> None:
        f = self._log_file
        if f is not None:
            f.close()  # type: ignore[attr-defined]
            self._log_file = None

    def cleanup_hard(self) -> None:
        """Failure path: kill the whole session, detach the mount."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)
        if mounted(self.device):
            detach(self.device)
        self._close_log()

    def session_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


def start_daemon(
    tmp_path: Path,
    *,
    extra_args: Sequence[str] = (),
    device: Path | None = None,
    state_dir: Path | None = None,
    wrap: Sequence[str] = (),
    name: str = "daemon",
    env: dict[str, str] | None = None,
    debug: bool = True,
) -> DaemonHandle:
    """Start a private daemon and wait until it is ready."""
    device = device or tmp_path / "helper"
    state_dir = state_dir or tmp_path / "run"
    state_dir.mkdir(exist_ok=True)
    log_path = tmp_path / f"{name}.log"
    log_file = log_path.open("ab")
    ready_r, ready_w = os.pipe()
    argv = [
        *wrap,
        sys.executable,
        "-m",
        "dtprobed",
        "-F",
        *(["-d"] if debug else []),
        "--device",
        str(device),
        "--device-mode",
        "fuse",
        "--state-dir",
        str(state_dir),
        "--ready-fd",
        str(ready_w),
        # generous: a loaded CI machine must not turn slow into failed (tests that
        # exercise the timeout pass their own -t, which comes later and wins)
        "--timeout",
        "30",
        *extra_args,
    ]
    environ = dict(os.environ)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        environ.pop(var, None)
    environ.update(env or {})
    proc = subprocess.Popen(
        argv,
        pass_fds=[ready_w],
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
        env=environ,
    )
    os.close(ready_w)
    handle = DaemonHandle(proc, device, state_dir, log_path, argv, log_file)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            ready, _, _ = select.select([ready_r], [], [], 0.05)
            if ready and os.read(ready_r, 1):
                break
            if proc.poll() is not None:
                raise AssertionError(
                    f"daemon terminated prematurely ({proc.returncode}):\n{handle.log_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready in {READY_TIMEOUT} s:\n{handle.log_text()}")
    except BaseException:
        handle.cleanup_hard()
        raise
    finally:
        os.close(ready_r)
    return handle


def finish(handle: DaemonHandle) -> None:
    """Success-path teardown: SIGTERM → exit 0, mount gone, session empty."""
    if handle.stopped:  # the test stopped or killed it on purpose
        if (
            handle.proc.returncode is not None
            and handle.proc.returncode < 0
            and mounted(handle.device)
        ):
            detach(handle.device)  # killed: its mount is stale
        return
    try:
        status = handle.stop()
    except BaseException:
        handle.cleanup_hard()
        raise
    log = handle.log_text()
    still_mounted = mounted(handle.device)
    deadline = time.monotonic() + 5
    while handle.session_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    leftovers = handle.session_alive()
    if still_mounted or leftovers:
        handle.cleanup_hard()
    assert status == 0, f"daemon exited with {status}:\n{log}"
    assert not still_mounted, f"{handle.device} still mounted after the daemon stopped"
    assert not leftovers, "processes of the daemon's session outlived it"
    assert "Traceback" not in log, f"unexpected traceback in the daemon log:\n{log}"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonHandle]:
    """A private daemon for one test; torn down with a checked clean stop."""
    handle = start_daemon(tmp_path)
    try:
        yield handle
    except BaseException:
        handle.cleanup_hard()
        raise
    finish(handle)


class DaemonFactory:
    """Starts daemons for one test (custom options, restarts) and finishes them all."""

    __test__ = False

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[DaemonHandle] = []

    def start(self, **kwargs: object) -> DaemonHandle:
        handle = start_daemon(self.tmp_path, name=f"daemon{len(self.started)}", **kwargs)  # type: ignore[arg-type]
        self.started.append(handle)
        return handle

    def finish_all(self) -> None:
        errors: list[BaseException] = []
        served: set[Path] = set()
        for handle in reversed(self.started):  # a restarted daemon serves the old path
            if handle.stopped and handle.device in served:
                continue
            served.add(handle.device)
            try:
                finish(handle)
            except BaseException as err:
                errors.append(err)
        if errors:
            raise errors[0]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.finish_all()


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")
