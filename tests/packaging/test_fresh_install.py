"""The README's install command on a "fresh host" of this kind: root, /dev/fuse, no systemd.

``bash packaging/install.sh`` runs for real — no ``--root`` — inside private
pid and mount namespaces (tests/packaging/fresh-host.sh) whose /usr/local,
/etc, /run, /var/log and /dev are private, so the host is untouched (and its
own installed daemon, if any, keeps serving: see conftest.py).  Pid 1 there
is not systemd and /run is on disk, not tmpfs, as on this machine kind.

The story, as CI machines and operators live it:

* a daemon run by hand left a stash on the disk /run/dtrace, with a live
  client's registration in it (and warned once that /run/dtrace is not tmpfs);
* install.sh mounts a tmpfs on /run/dtrace, moves that stash onto it intact
  (``dtprobed-stash verify``), starts the daemon, which serves, watches the
  client and does not warn;
* install.sh again, from another checkout path: a new daemon, the tmpfs and
  the stash kept; and once more with the pid file gone (the old daemon is
  found by its command line);
* uninstall.sh stops it and removes the files, keeping the stash and its
  tmpfs; ``--purge`` unmounts the tmpfs.
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

from tests.packaging.conftest import REPO, WORK_IN_NS, start_namespaced_client
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


def tmpfs_source(host: FreshHost, path: str) -> str:
    """'FSTYPE SOURCE' of the topmost mount on *path* in the fresh host ('' if none)."""
    found = host.run("findmnt", "-n", "-o", "FSTYPE,SOURCE", "--mountpoint", path).stdout
    return " ".join(found.split())


def fs_kind(host: FreshHost, path: str) -> str:
    return host.run("stat", "-f", "-c", "%T", path).stdout.strip()


def install(host: FreshHost, checkout: str = str(REPO)) -> subprocess.CompletedProcess[str]:
    result = host.run("sh", "-c", f"cd {checkout} && bash packaging/install.sh")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "systemd is not pid 1" in result.stdout
    assert "serving /dev/dtrace/helper" in result.stdout, result.stdout
    return result


def daemon_by_hand(host: FreshHost, tmp_path: Path) -> int:
    """A daemon started from the checkout (not installed) on /run/dtrace; its pid there."""
    started = host.run(
        "sh",
        "-c",
        f"setsid {REPO}/.venv/bin/python -m dtprobed -F --device-mode fuse -s /run/dtrace"
        f" </dev/null >{WORK_IN_NS}/by-hand.log 2>&1 & echo $!",
    )
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 30
    while "ready: serving" not in (tmp_path / "by-hand.log").read_text():
        assert time.monotonic() < deadline, (tmp_path / "by-hand.log").read_text()
        time.sleep(0.05)
    return int(started.stdout)


def stop_in_host(host: FreshHost, pid: int) -> None:
    assert host.run("kill", "-TERM", str(pid)).returncode == 0
    deadline = time.monotonic() + 30
    while host.run("kill", "-0", str(pid)).returncode == 0:
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_install_command_on_a_host_without_systemd(
    fresh_host: FreshHost, tmp_path: Path
) -> None:
    host = fresh_host
    code_file(tmp_path)
    write_dof(tmp_path, "probes", code_dof().data)
    # This machine kind: /run is on disk (fresh-host.sh gives it a WORK_DIR directory).
    assert fs_kind(host, "/run") not in ("tmpfs", "ramfs"), fs_kind(host, "/run")

    # A stash on the disk /run/dtrace, with a live client in it.
    by_hand = daemon_by_hand(host, tmp_path)
    client, hello = start_namespaced_client(host.pid1)
    try:
        assert hello.get("register", {}).get("gen") == 0, (
            hello,
            (tmp_path / "by-hand.log").read_text(),
        )
        pid = hello["pid"]
        stop_in_host(host, by_hand)
        by_hand_log = (tmp_path / "by-hand.log").read_text()
        assert by_hand_log.count("is on ext4, not tmpfs") == 1, by_hand_log
        stash_pid_dir = f"/run/dtrace/stash/dof-pid/{pid}"
        assert host.run("test", "-d", stash_pid_dir).returncode == 0

        first = install(host)
        assert "moving the stash in /run/dtrace onto the tmpfs" in first.stdout, first.stdout
        assert "mounted a tmpfs on /run/dtrace (size=" in first.stdout, first.stdout
        assert tmpfs_source(host, "/run/dtrace") == "tmpfs dtprobed"
        assert fs_kind(host, "/run/dtrace") == "tmpfs"
        first_pid = host.daemon_pid()
        assert first_pid is not None
        # The moved stash is whole (hard links, xattrs) and the new daemon watches the client.
        assert host.run("test", "-d", stash_pid_dir).returncode == 0
        verify = host.run("dtprobed-stash", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        log = host.run("cat", "/var/log/dtprobed.log").stdout
        assert "state directory /run/dtrace, 1 processes watched" in log, log
        assert "not tmpfs" not in log, log

        # A second program registers through the installed daemon.
        second, hello2 = start_namespaced_client(host.pid1)
        try:
            assert hello2.get("register", {}).get("gen") == 0, (hello2, log)
            pid2 = hello2["pid"]
            deadline = time.monotonic() + 10
            while f"{pid2}: registered generation 0" not in log:
                assert time.monotonic() < deadline, log
                time.sleep(0.05)
                log = host.run("cat", "/var/log/dtprobed.log").stdout
            listing = host.run("dtprobed-stash", "list", "--json")
            assert listing.returncode == 0 and str(pid2) in listing.stdout, listing
        finally:
            second.kill()
            second.wait(30)
            for stream in (second.stdin, second.stdout):
                if stream is not None:
                    stream.close()

        # Again, from another checkout (CI's next clone): a new daemon, tmpfs and stash kept.
        copied = host.run(
            "sh",
            "-c",
            f"mkdir /tmp/other-checkout && tar -C {REPO} --exclude=./.venv --exclude=./.git"
            " -cf - . | tar -C /tmp/other-checkout -xf -",
        )
        assert copied.returncode == 0, copied.stderr
        again = install(host, "/tmp/other-checkout")
        assert "/run/dtrace is on tmpfs: kept as it is" in again.stdout, again.stdout
        assert f"stopping dtprobed (pid {first_pid})" in again.stdout, again.stdout
        second_pid = host.daemon_pid()
        assert second_pid not in (None, first_pid)
        assert host.run("kill", "-0", str(first_pid)).returncode != 0
        assert host.run("rm", "-rf", "/tmp/other-checkout").returncode == 0
        assert host.run("test", "-d", stash_pid_dir).returncode == 0

        # And once more with its pid file gone: found by its command line, replaced.
        assert host.run("rm", "/run/dtprobed.pid").returncode == 0
        third = install(host)
        assert f"stopping dtprobed (pid {second_pid})" in third.stdout, third.stdout
        third_pid = host.daemon_pid()
        assert third_pid not in (None, first_pid, second_pid)
        assert host.run("kill", "-0", str(second_pid)).returncode != 0
        assert tmpfs_source(host, "/run/dtrace") == "tmpfs dtprobed"
        assert host.run("test", "-d", stash_pid_dir).returncode == 0
        verify = host.run("dtprobed-stash", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        client.kill()
        client.wait(30)
        for stream in (client.stdin, client.stdout):
            if stream is not None:
                stream.close()

    uninstall = host.run("bash", "packaging/uninstall.sh")
    assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr
    assert "kept the stash in /run/dtrace, on the tmpfs install.sh mounted" in uninstall.stdout
    gone = host.run(
        "sh",
        "-c",
        f"! kill -0 {third_pid} 2>/dev/null && ! test -e /usr/local/sbin/dtprobed"
        " && ! test -e /usr/local/lib/dtprobed && ! test -e /run/dtprobed.pid"
        " && ! grep -q ' /dev/dtrace/helper ' /proc/self/mountinfo",
    )
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert tmpfs_source(host, "/run/dtrace") == "tmpfs dtprobed"
    final_log = host.run("cat", "/var/log/dtprobed.log").stdout
    assert "stopped (exit status 0)" in final_log, final_log
    assert "Traceback" not in final_log, final_log

    purge = host.run("bash", "packaging/uninstall.sh", "--purge")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert "unmounting the tmpfs on /run/dtrace" in purge.stdout, purge.stdout
    assert tmpfs_source(host, "/run/dtrace") == ""
    assert host.run("test", "-e", "/run/dtrace").returncode != 0

    # A tmpfs install.sh did not mount: --purge empties it and leaves it mounted.
    foreign = host.run(
        "sh",
        "-c",
        "mkdir /run/dtrace && mount -t tmpfs other /run/dtrace && touch /run/dtrace/x"
        " && bash packaging/uninstall.sh --purge",
    )
    assert foreign.returncode == 0, foreign.stdout + foreign.stderr
    assert "unmounting" not in foreign.stdout, foreign.stdout
    assert tmpfs_source(host, "/run/dtrace") == "tmpfs other"
    assert host.run("ls", "-A", "/run/dtrace").stdout == ""
