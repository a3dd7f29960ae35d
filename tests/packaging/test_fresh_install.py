"""The README's install command on a "fresh host" of this kind: root, /dev/fuse, no systemd.

``bash packaging/install.sh`` runs for real — no ``--root`` — inside private
pid and mount namespaces (tests/packaging/fresh-host.sh) whose /usr/local,
/etc, /run, /var/log and /dev are private, so the host is untouched.  Pid 1
there is not systemd, so install.sh must start the daemon directly with
working defaults; a client must then register through /dev/dtrace/helper; a
second run must upgrade in place (restart, stash kept); uninstall.sh must
stop it and remove the files, keeping the stash.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.packaging.conftest import REPO, start_namespaced_client
from tests.support.clients import code_dof, code_file, write_dof

HERE = Path(__file__).resolve().parent


@dataclass
class FreshHost:
    proc: subprocess.Popen[bytes]
    pid1: int

    __test__ = False

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        for name, value in os.environ.items():
            if name.startswith("PIP_") or name in ("HOME", "LANG"):
                env[name] = value
        return subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-m", "-p", f"--wd={REPO}", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def daemon_pid(self) -> int | None:
        result = self.run("cat", "/run/dtprobed.pid")
        return int(result.stdout) if result.returncode == 0 else None


@pytest.fixture
def fresh_host(tmp_path: Path) -> Iterator[FreshHost]:
    console = tmp_path / "console.log"
    with console.open("wb") as out:
        proc = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                "--mount",
                "--propagation",
                "private",
                "--mount-proc",
                "bash",
                str(HERE / "fresh-host.sh"),
                str(tmp_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    pid1 = None
    try:
        deadline = time.monotonic() + 30
        while "fresh-host: ready" not in console.read_text(errors="replace"):
            assert proc.poll() is None, console.read_text(errors="replace")
            assert time.monotonic() < deadline, "fresh host did not come up"
            time.sleep(0.05)
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            (pid1,) = (int(x) for x in f.read().split())
        yield FreshHost(proc, pid1)
    finally:
        # Killing pid 1 of the namespace kills the daemon and everything else in it;
        # the mounts (the helper's included) go with the namespace.
        if pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid1, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_install_command_on_a_host_without_systemd(
    fresh_host: FreshHost, tmp_path: Path
) -> None:
    host = fresh_host
    code_file(tmp_path)
    write_dof(tmp_path, "probes", code_dof().data)

    install = host.run("bash", "packaging/install.sh")
    assert install.returncode == 0, install.stdout + install.stderr
    assert "systemd is not pid 1" in install.stdout
    assert "serving /dev/dtrace/helper" in install.stdout, install.stdout
    first_pid = host.daemon_pid()
    assert first_pid is not None

    client, hello = start_namespaced_client(host.pid1)
    try:
        log = host.run("cat", "/var/log/dtprobed.log").stdout
        assert hello.get("register", {}).get("gen") == 0, (hello, log)
        pid = hello["pid"]
        # the client has its answer before the daemon writes the log line
        deadline = time.monotonic() + 10
        while f"{pid}: registered generation 0" not in log:
            assert time.monotonic() < deadline, log
            time.sleep(0.05)
            log = host.run("cat", "/var/log/dtprobed.log").stdout
        listing = host.run("dtprobed-stash", "list", "--json")
        assert listing.returncode == 0 and str(pid) in listing.stdout, listing

        # Running the command again upgrades in place: a new daemon, the stash kept.
        again = host.run("bash", "packaging/install.sh")
        assert again.returncode == 0, again.stdout + again.stderr
        second_pid = host.daemon_pid()
        assert second_pid not in (None, first_pid)
        assert host.run("test", "-d", f"/run/dtrace/stash/dof-pid/{pid}").returncode == 0
    finally:
        client.kill()
        client.wait(30)
        for stream in (client.stdin, client.stdout):
            if stream is not None:
                stream.close()

    uninstall = host.run("bash", "packaging/uninstall.sh")
    assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr
    assert "kept the stash in /run/dtrace" in uninstall.stdout
    gone = host.run(
        "sh",
        "-c",
        f"! kill -0 {second_pid} 2>/dev/null && ! test -e /usr/local/sbin/dtprobed"
        " && ! test -e /usr/local/lib/dtprobed && ! test -e /run/dtprobed.pid"
        " && ! grep -q ' /dev/dtrace/helper ' /proc/self/mountinfo",
    )
    assert gone.returncode == 0, gone.stdout + gone.stderr
    final_log = host.run("cat", "/var/log/dtprobed.log").stdout
    assert "stopped (exit status 0)" in final_log, final_log
    assert "Traceback" not in final_log, final_log
