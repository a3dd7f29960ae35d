"""The real dtrace 2.0.7 against our daemon in CUSE mode, in the VM (Debian 6.1 kernel).

The sid chroot (tests/realdtrace/chroot.sh) is on the host's root, which the VM sees
read-only under a tmpfs overlay: ``partner.mounted`` mounts the guest's /proc, /sys, /dev,
/dev/shm, tracefs and debugfs into it (the host's own mounts there show through 9p as plain
directories; the guest's mountinfo does not list them, so they are mounted over). The host
side (tests/realkernel/test_in_vm.py) builds the chroot and the programs before the boot:
here ``build_programs`` finds them cached.

What CUSE adds to tests/realdtrace/test_interop.py (FUSE mode, host): the kernel here is
not locked down, so an enabling with an is-enabled site loads (``RDTMAIN_TICK_ENABLED()``
turns 1), and drti's ``DTRACEHIOC_REMOVE`` reaches the daemon: a dlclose()d library's
registration goes at once, and the exit's REMOVE removes the executable's.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.realdtrace import dofclient, partner
from tests.realkernel.harness import REPO, PrivateDaemon, private_device
from tests.realkernel.harness import wait_until as _wait_until

pytestmark = pytest.mark.timeout(900)

#: tick's uint64_t argument base: above 2**63 (a 32-bit or signed reading prints otherwise).
BIG = 0xFFFFFFFF00000000
#: dtrace waits this long at most for the script's own exit(0) (emulated: slow).
FIRE_WINDOW = 400.0
START_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def root() -> Path:
    return partner.ensure_chroot()


#: Where the programs run from in the chroot: a tmpfs of the guest's own (see ``progs``).
PROGS_INSIDE = "/var/tmp/dtprobed-py-realdtrace"


@pytest.fixture(scope="module")
def progs(root: Path) -> Iterator[partner.Programs]:
    """The built programs, copied to a guest tmpfs mounted in the chroot.

    Not run from where they were built: that is the overlay on the 9p root, and this 6.1
    kernel's /proc/PID/maps names an overlayfs file by the inode of the layer below
    (00:17 here) while stat() of its path says the overlay's device, and our daemon
    refuses such a registration ("object ... is 27-N, but its mapping says 23-N"; the
    host's 6.18 kernel shows the overlay's device in maps, so there it works). That is a
    known open defect of the daemon, reported separately; these tests are about CUSE.
    """
    built = partner.build_programs(root)
    point = partner.host_path(root, PROGS_INSIDE)
    point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "rdtprogs", str(point)], check=True)
    try:
        for obj in (built.usdtprog, built.libusdtlib):
            shutil.copy2(obj, point / obj.name)
        yield partner.Programs(point, PROGS_INSIDE)
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[PrivateDaemon]:
    tmp = tmp_path_factory.mktemp("realdtrace")
    state = tmp / "state"
    state.mkdir()
    # -t 60: under emulation on a loaded host a child's first answer can take seconds
    daemon = PrivateDaemon(
        private_device("cuse", tmp), state, "cuse", tmp / "dtprobed.log", ["-d", "-t", "60"]
    )
    daemon.start()
    try:
        assert daemon.served_as() == "cuse"
        # tmp holds the state directory and the ADDDOF client's code file: dtrace opens both
        with partner.mounted(root=root, binds=[tmp]):
            yield daemon
    finally:
        if daemon.proc is not None:
            assert daemon.stop(signal.SIGTERM) == 0
        daemon.cleanup()
        print(daemon.log()[-4000:])
        shutil.rmtree(state, ignore_errors=True)


def wait_until(daemon: PrivateDaemon, predicate: Callable[[], bool], what: str) -> None:
    """harness.wait_until, failing with the end of the daemon's log."""
    try:
        _wait_until(predicate, what)
    except AssertionError as err:
        raise AssertionError(f"{err}; daemon log:\n{daemon.log()[-6000:]}") from None


def gens(daemon: PrivateDaemon, pid: int) -> list[int]:
    d = daemon.state_dir / "stash" / "dof-pid" / str(pid)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def rows(daemon: PrivateDaemon, root: Path, pattern: str) -> set[tuple[str, str, str, str]]:
    listed = partner.dtrace_list(daemon.state_dir, pattern, root=root, timeout=START_TIMEOUT)
    return {(r.provider, r.module, r.function, r.name) for r in listed.rows}


def main_rows(pid: int) -> set[tuple[str, str, str, str]]:
    prov = f"rdtmain{pid}"
    return {
        (prov, "usdtprog", "fire_ticks", "tick"),
        (prov, "usdtprog", "fire_ticks", "done-all"),
        (prov, "usdtprog", "serve", "start"),
        (prov, "usdtprog", "serve", "tick"),  # the is-enabled site
    }


def test_cuse_hasusdt_list_fire_isenabled_dlclose(
    daemon: PrivateDaemon, root: Path, progs: partner.Programs
) -> None:
    prog = partner.Program.start(
        progs.usdtprog, devname=daemon.device, root=root, env={"DTRACE_DOF_INIT_DEBUG": "1"}
    )
    lib = f"rdtlib{prog.pid}"
    try:
        wait_until(daemon, lambda: gens(daemon, prog.pid) == [0], "HASUSDT registration (gen 0)")
        assert rows(daemon, root, f"rdtmain{prog.pid}") == main_rows(prog.pid)
        assert prog.command("e") == "e 0"  # nobody enables tick yet

        def trigger() -> None:
            assert prog.command("e") == "e 1"  # the is-enabled site, enabled by dtrace
            assert prog.command("s") == "s"
            assert prog.command(f"f 3 {BIG}") == "f 3"

        # every tick site: the regular one in fire_ticks and the is-enabled one in serve
        out = partner.dtrace_fire(
            daemon.state_dir,
            'rdtmain$target:::tick { printf("tick %d %u\\n", args[0], args[1]); }'
            ' rdtmain$target:::start { printf("start %s %d\\n", copyinstr(arg0), args[1]); }'
            ' rdtmain$target:::done-all { printf("done %d\\n", args[0]); exit(0); }',
            prog.pid,
            trigger=trigger,
            duration=FIRE_WINDOW,
            start_timeout=START_TIMEOUT,
            root=root,
        )
        assert [ln for ln in out.stdout.splitlines() if ln] == [
            f"start usdtprog {prog.pid}",
            f"tick 0 {BIG}",
            f"tick 1 {BIG + 1000}",
            f"tick 2 {BIG + 2000}",
            "done 3",
        ], out.stderr
        assert prog.command("e") == "e 0"  # dtrace has gone

        assert prog.command("o").startswith("o /")
        wait_until(daemon, lambda: gens(daemon, prog.pid) == [0, 1], "the library's registration")
        assert rows(daemon, root, f"rdt*{prog.pid}") == main_rows(prog.pid) | {
            (lib, "libusdtlib.so", "rdtlib_fire", "enter"),
            (lib, "libusdtlib.so", "rdtlib_fire", "call"),
        }
        assert prog.command("c") == "c"
        # CUSE delivers drti's REMOVE at dlclose: generation 1 goes, gen 0 stays
        # the log line comes after the reply: wait for it, not only for the stash
        wait_until(
            daemon,
            lambda: f"{prog.pid}: removed generation 1" in daemon.log(),
            "REMOVE of the library's gen 1",
        )
        assert gens(daemon, prog.pid) == [0]
        assert not (daemon.state_dir / "probes" / str(prog.pid) / lib).exists()
        assert rows(daemon, root, f"rdt*{prog.pid}") == main_rows(prog.pid)
    finally:
        status, err = prog.quit()
    assert status == 0, err
    # drti's own messages: both registrations OK, both REMOVEs answered
    assert err.count("DRTI: Ioctl OK") == 2, err
    assert "Ioctl failed" not in err, err
    wait_until(
        daemon,
        lambda: f"{prog.pid}: removed generation 0" in daemon.log(),
        "REMOVE of gen 0 at exit",
    )
    assert gens(daemon, prog.pid) == []
    assert not (daemon.state_dir / "probes" / str(prog.pid)).exists()


#: Every tick site (the regular one in fire_ticks, the is-enabled one in serve), typed args.
MAIN_SCRIPT = (
    'rdtmain$target:::tick { printf("tick %d %u\\n", args[0], args[1]); }'
    ' rdtmain$target:::done-all { printf("done %d\\n", args[0]); exit(0); }'
)


def test_cuse_fork_child_registers_fires_and_removes(
    daemon: PrivateDaemon, root: Path, progs: partner.Programs
) -> None:
    prog = partner.Program.start(progs.usdtprog, devname=daemon.device, root=root)
    try:
        wait_until(daemon, lambda: gens(daemon, prog.pid) == [0], "the parent's registration")
        child = int(prog.command("k").split()[1])
        assert prog.expect(f"{child} ") == f"{child} ready"
        wait_until(
            daemon, lambda: gens(daemon, child) == [0], "the child's own registration (gen 0)"
        )
        assert rows(daemon, root, f"rdtmain{child}") == main_rows(child)

        def trigger() -> None:
            assert prog.command("> e") == ">"
            assert prog.expect(f"{child} ") == f"{child} ok e 1"
            assert prog.command("> f 2") == ">"
            assert prog.expect(f"{child} ") == f"{child} ok f 2"

        out = partner.dtrace_fire(
            daemon.state_dir,
            MAIN_SCRIPT,
            child,
            trigger=trigger,
            duration=FIRE_WINDOW,
            start_timeout=START_TIMEOUT,
            root=root,
        )
        assert [ln for ln in out.stdout.splitlines() if ln] == [
            "tick 0 0",
            "tick 1 1000",
            "done 2",
        ], out.stderr
        assert prog.command("e") == "e 0"  # the parent's site was never enabled
        assert prog.command("w") == "w 0"
        # the child's exit sent REMOVE(0) for the child only
        wait_until(
            daemon, lambda: f"{child}: removed generation 0" in daemon.log(), "the child's REMOVE"
        )
        assert gens(daemon, child) == []
        assert gens(daemon, prog.pid) == [0]
    finally:
        status, err = prog.quit()
    assert status == 0, err
    wait_until(daemon, lambda: gens(daemon, prog.pid) == [], "the parent's REMOVE at exit")


def test_cuse_adddof_client_listed_and_fired(daemon: PrivateDaemon, root: Path) -> None:
    work = daemon.state_dir.parent  # bound into the chroot
    code = work / "dofclient.code"
    code.write_bytes(dofclient.code_bytes())
    dof = work / "dofclient.dof"
    dof.write_bytes(dofclient.object_file(relocate=True))
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.realdtrace.dofclient", "--device", daemon.device),
            *("--code-file", str(code), "--dof-file", str(dof)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        hello = json.loads(proc.stdout.readline())
        pid = hello["pid"]
        assert hello["register"].get("gen") == 0, hello
        prov = f"{dofclient.PROVIDER}{pid}"
        assert rows(daemon, root, prov) == {
            (prov, "dofclient", "fn0", "start"),
            (prov, "dofclient", "fn1", "done"),
        }

        def trigger() -> None:
            proc.stdin.write("fire 2\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            assert json.loads(proc.stdout.readline()) == {"fired": 2}  # type: ignore[union-attr]

        out = partner.dtrace_fire(
            daemon.state_dir,
            f'{dofclient.PROVIDER}$target:::start {{ printf("start %d %s\\n", args[0],'
            " copyinstr(arg1)); }"
            f' {dofclient.PROVIDER}$target:::done {{ printf("done %d\\n", args[0]); exit(0); }}',
            pid,
            trigger=trigger,
            duration=FIRE_WINDOW,
            start_timeout=START_TIMEOUT,
            root=root,
        )
        assert [ln for ln in out.stdout.splitlines() if ln] == [
            "start 0 dofclient",
            "start 1 dofclient",
            "done 2",
        ], out.stderr
    finally:
        proc.stdin.write("exit\n")
        proc.stdin.close()
        assert proc.wait(60) == 0
    wait_until(daemon, lambda: gens(daemon, pid) == [], "exit pruning of the ADDDOF client")
