"""The installed unit under a real systemd: every hardening setting, the documented commands.

This machine's pid 1 is not systemd, so the test boots one: systemd as pid 1
of a new pid namespace, in its own mount and cgroup namespaces, seeing the
staged installation as installed (tests/packaging/nested-systemd.sh).  Then
it runs exactly what docs/operations.md tells an operator to run
(``systemctl enable --now dtprobed``) and checks, through the unit as
shipped (only the daemon's stderr is redirected to a file by a drop-in):

* the daemon starts under the full sandbox (capability bounding set, system
  call filter, MemoryDenyWriteExecute, RestrictNamespaces=mnt,
  ProtectSystem=strict, PrivateNetwork, ...) and becomes active (READY=1);
* a client *outside* the service's mount namespace registers through
  /dev/dtrace/helper (the FUSE mount is made in pid 1's namespace);
* the watchdog is fed; a restart keeps the stash; the registration is
  pruned when the client exits; a stop exits 0, removes the mount and the
  stash (RuntimeDirectoryPreserve=restart).

Not covered here: DevicePolicy= enforcement (this nested systemd has no
devices controller to enforce it with) and IPAddressDeny= (no BPF).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.packaging.conftest import REPO, StagedInstall, start_namespaced_client
from tests.support.clients import code_dof, code_file, write_dof

HERE = Path(__file__).resolve().parent
CGROUP_ROOT = Path("/sys/fs/cgroup")
BOOT_TIMEOUT = 30.0


def cgroup_layout() -> tuple[str, list[Path]]:
    """('hybrid', [name=systemd v1, unified v2]) or ('unified', [the v2 root])."""
    if (CGROUP_ROOT / "systemd").is_dir() and (CGROUP_ROOT / "unified").is_dir():
        return "hybrid", [CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified"]
    return "unified", [CGROUP_ROOT]


def remove_cgroup_tree(path: Path) -> None:
    """rmdir *path* and everything below it, deepest first (cgroups can't be rm -r'ed)."""
    if not path.is_dir():
        return
    dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*dirs, path]:
        with contextlib.suppress(OSError):
            d.rmdir()


@dataclass
class NestedSystemd:
    """A private systemd; :meth:`run` executes a command in its namespaces."""

    proc: subprocess.Popen[bytes]
    pid1: int  # its pid in our namespace
    work: Path

    __test__ = False

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-m", "-p", "-C", f"--wd={REPO}", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args)

    def show(self, *props: str) -> dict[str, str]:
        out = self.systemctl("show", "dtprobed.service", "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def daemon_log(self) -> str:
        path = self.work / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    def wait_for(self, what: str, predicate: object, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            if self.proc.poll() is not None:
                pytest.fail(f"nested systemd exited ({self.proc.returncode}) waiting for {what}")
            if time.monotonic() > deadline:
                status = self.systemctl("status", "dtprobed.service").stdout
                pytest.fail(f"timed out waiting for {what}\n{status}\n{self.daemon_log()}")
            time.sleep(0.05)


def _find_pid1(unshare_pid: int) -> int | None:
    """The systemd the unshare process forked (its only child)."""
    try:
        with open(f"/proc/{unshare_pid}/task/{unshare_pid}/children") as f:
            children = [int(x) for x in f.read().split()]
    except OSError:
        return None
    for child in children:
        with contextlib.suppress(OSError), open(f"/proc/{child}/comm") as f:
            if f.read().strip() == "systemd":
                return child
    return None


@pytest.fixture
def nested_systemd(staged: StagedInstall, tmp_path: Path) -> Iterator[NestedSystemd]:
    """A private systemd that sees the session's staged installation as installed."""
    yield from boot_nested_systemd(str(staged.root), tmp_path)


@pytest.fixture
def bare_systemd(tmp_path: Path) -> Iterator[NestedSystemd]:
    """A private systemd on a host where nothing of dtprobed-py is installed yet."""
    yield from boot_nested_systemd("none", tmp_path)


def boot_nested_systemd(stage: str, tmp_path: Path) -> Iterator[NestedSystemd]:
    layout, hierarchies = cgroup_layout()
    name = f"dtprobed-test-{uuid.uuid4().hex[:8]}"
    cgroups = [h / name for h in hierarchies]
    for cg in cgroups:
        cg.mkdir()
    procs_files = " ".join(f"{cg}/cgroup.procs" for cg in cgroups)
    # The shell moves itself into the fresh cgroups, then becomes unshare.
    script = (
        f'for f in {procs_files}; do echo $$ > "$f"; done; '
        "exec unshare --pid --fork --mount --cgroup --propagation private --mount-proc "
        f'bash "{HERE}/nested-systemd.sh" "{stage}" "{tmp_path}" {layout}'
    )
    console = (tmp_path / "console.log").open("wb")
    proc = subprocess.Popen(
        ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        pid1 = None
        while pid1 is None:
            assert proc.poll() is None, (tmp_path / "console.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "nested systemd did not start"
            time.sleep(0.05)
            pid1 = _find_pid1(proc.pid)
        nested = NestedSystemd(proc, pid1, tmp_path)
        nested.wait_for(
            "the nested systemd to finish booting",
            lambda: nested.systemctl("is-system-running").stdout.strip() in ("running", "degraded"),
        )
        yield nested
    finally:
        # Killing pid 1 of the namespace kills everything in it; its mounts
        # (the helper FUSE mount included) go with the mount namespace.
        pid1 = _find_pid1(proc.pid)
        if pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid1, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(30)
        console.close()
        for cg in cgroups:
            deadline = time.monotonic() + 10
            while (cg / "cgroup.procs").exists() and time.monotonic() < deadline:
                procs = [p for p in cg.rglob("cgroup.procs") if p.read_text().strip()]
                if not procs:
                    break
                time.sleep(0.05)
            remove_cgroup_tree(cg)


def start_client(nested: NestedSystemd) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A fake USDT client in the nested host namespace that registers at start-up."""
    return start_namespaced_client(nested.pid1)


def end_client(client: subprocess.Popen[str]) -> None:
    assert client.stdin is not None and client.stdout is not None
    with contextlib.suppress(BrokenPipeError):
        client.stdin.write('{"op": "exit"}\n')
        client.stdin.close()
    client.wait(30)
    client.stdout.close()


def register_client(nested: NestedSystemd) -> tuple[subprocess.Popen[str], int]:
    """A fake USDT client in the nested host namespace, once registered, and its pid there."""
    client, hello = start_client(nested)
    if hello.get("register", {}).get("gen") != 0:
        end_client(client)
        pytest.fail(f"registration failed: {hello}\n{nested.daemon_log()}")
    return client, int(hello["pid"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unit_runs_hardened_under_systemd(nested_systemd: NestedSystemd, tmp_path: Path) -> None:
    nested = nested_systemd
    code_file(tmp_path)
    write_dof(tmp_path, "probes", code_dof().data)

    enable = nested.systemctl("enable", "--now", "dtprobed.service")
    assert enable.returncode == 0, enable.stderr + nested.daemon_log()
    state = nested.show("ActiveState", "SubState", "MainPID", "NRestarts")
    assert state["ActiveState"] == "active", (state, nested.daemon_log())
    assert state["NRestarts"] == "0"
    assert nested.systemctl("is-enabled", "dtprobed.service").stdout.strip() == "enabled"
    # Also=dtrace-usdt.target: enabled with it (it comes up at boot, with basic.target;
    # RefuseManualStart= keeps it from being started by hand).
    assert nested.systemctl("is-enabled", "dtrace-usdt.target").stdout.strip() == "enabled"
    log = nested.daemon_log()
    assert "mounting in the mount namespace of pid 1" in log, log

    # The sandbox is really there: the daemon's own view of its privileges.
    main_pid = state["MainPID"]
    status = nested.run("cat", f"/proc/{main_pid}/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    # CAP_SYS_CHROOT (18), CAP_SYS_PTRACE (19), CAP_SYS_ADMIN (21)
    assert int(fields["CapBnd"], 16) == (1 << 18) | (1 << 19) | (1 << 21)
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    own_ns = nested.run("readlink", f"/proc/{main_pid}/ns/mnt", "/proc/1/ns/mnt").stdout.split()
    assert own_ns[0] != own_ns[1], "the service should run in its own mount namespace"

    # A client outside the service's mount namespace registers.
    client, pid = register_client(nested)
    try:
        stash_pid_dir = f"/run/dtrace/stash/dof-pid/{pid}"
        assert nested.run("test", "-d", stash_pid_dir).returncode == 0, nested.daemon_log()
        listing = nested.run("dtprobed-stash", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        assert str(pid) in listing.stdout

        # The watchdog is fed (WatchdogSec=30s: a ping at least every 15 s).
        first = nested.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
        nested.wait_for(
            "a WATCHDOG=1 ping",
            lambda: (
                nested.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != first
            ),
            timeout=60,
        )

        # A restart keeps the stash, and the new daemon watches the client.
        restart = nested.systemctl("restart", "dtprobed.service")
        assert restart.returncode == 0, restart.stderr + nested.daemon_log()
        after = nested.show("ActiveState", "MainPID")
        assert after["ActiveState"] == "active"
        assert after["MainPID"] != main_pid
        assert nested.run("test", "-d", stash_pid_dir).returncode == 0, nested.daemon_log()
    finally:
        end_client(client)
    nested.wait_for(
        "the exited client to be pruned",
        lambda: nested.run("test", "-e", stash_pid_dir).returncode != 0,
    )

    stop = nested.systemctl("stop", "dtprobed.service")
    assert stop.returncode == 0, stop.stderr
    final = nested.show("ActiveState", "Result", "ExecMainStatus")
    assert final == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, (
        final,
        nested.daemon_log(),
    )
    mounts = nested.run("cat", "/proc/1/mountinfo").stdout
    assert "/dev/dtrace/helper" not in mounts
    assert nested.run("test", "-e", "/run/dtrace").returncode != 0
    log = nested.daemon_log()
    assert "Traceback" not in log, log
    assert "stopped (exit status 0)" in log, log


CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_each_capability_of_the_bounding_set_is_needed(
    nested_systemd: NestedSystemd, tmp_path: Path
) -> None:
    """Drop one capability at a time (a drop-in): the daemon must no longer serve.

    Without CAP_SYS_ADMIN or CAP_SYS_CHROOT the mount in pid 1's namespace is
    refused and the daemon exits 1, which RestartPreventExitStatus=1 keeps
    from restarting; without CAP_SYS_PTRACE it can't look at pid 1's namespace
    nor read the caller, and the client's registration fails.
    """
    nested = nested_systemd
    code_file(tmp_path)
    write_dof(tmp_path, "probes", code_dof().data)
    dropin = "/etc/systemd/system/dtprobed.service.d/caps.conf"
    for dropped in CAPABILITIES:
        kept = " ".join(cap for cap in CAPABILITIES if cap != dropped)
        written = nested.run(
            "sh",
            "-c",
            f"printf '[Service]\\nCapabilityBoundingSet=\\nCapabilityBoundingSet={kept}\\n'"
            f" > {dropin} && systemctl daemon-reload",
        )
        assert written.returncode == 0, written.stderr
        nested.systemctl("reset-failed", "dtprobed.service")
        nested.systemctl("restart", "dtprobed.service")
        state = nested.show("ActiveState", "ExecMainStatus", "NRestarts")
        client, hello = start_client(nested)
        end_client(client)
        log = nested.daemon_log()
        assert "gen" not in hello.get("register", {}), (dropped, hello, state, log)
        if dropped != "CAP_SYS_PTRACE":
            assert state == {"ActiveState": "failed", "ExecMainStatus": "1", "NRestarts": "0"}, (
                dropped,
                state,
                log,
            )
            assert "Operation not permitted" in log, log


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_and_uninstall_scripts_on_a_systemd_host(
    bare_systemd: NestedSystemd, tmp_path: Path
) -> None:
    """The README's command where systemd is pid 1: enabled, running, serving; then removed."""
    nested = bare_systemd
    code_file(tmp_path)
    write_dof(tmp_path, "probes", code_dof().data)
    # systemd's own PATH and a clean environment, as for an administrator's shell.
    pip_env = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("PIP_")]
    install = nested.run("env", *pip_env, "bash", "packaging/install.sh", timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    assert "dtprobed.service is enabled and running" in install.stdout, install.stdout
    assert nested.systemctl("is-enabled", "dtprobed.service").stdout.strip() == "enabled"
    client, _ = register_client(nested)
    end_client(client)

    uninstall = nested.run("bash", "packaging/uninstall.sh")
    assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr
    state = nested.show("ActiveState", "LoadState")
    assert state == {"ActiveState": "inactive", "LoadState": "not-found"}, state
    left = nested.run(
        "sh",
        "-c",
        "ls /usr/local/lib/systemd/system /usr/local/sbin /usr/local/lib /etc/udev/rules.d"
        " /etc/systemd/system/basic.target.wants 2>/dev/null | grep -i dtprobed || true",
    )
    assert left.stdout == "", left.stdout
    log = nested.daemon_log()
    assert "stopped (exit status 0)" in log, log
