"""Catch-up: programs started while no daemon served the helper get their probes afterwards.

With no daemon running, programs built like ``dtrace -G`` <= 2.0.2 made them
(:mod:`tests.support.sunw_dof`: ``.SUNW_dof`` and an old-drti constructor) start and
their constructor's ``open()`` of the helper fails. Then a private FUSE-mode daemon
starts on that helper path; it must register each one as its constructor would have
(the same checks as a live registration: ``check_stash`` of ``test_sunw_dof``, i.e.
``dh``, raw DOF and every parsed file), skip the processes that asked not to be
registered with it, never register anything twice, and leave a stash ``verify`` accepts.

The second half drives :class:`~dtprobed.daemon.catchup.CatchUp` in this process with
the daemon's real receiver, sandboxed parsers, stash writer and exit watcher, and a
fake CUSE kernel for the REMOVEs (FUSE mode never delivers REMOVE): it interleaves the
programs' actions with the scan at exact points (exit, dlclose, exec, their own
registration) to check the races, and REMOVE(0) / REMOVE(-1) from a caught-up process.
The real dtrace 2.0.7 side is ``tests/realdtrace/test_catchup_real.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.ioctl import DTRACEHIOC_ADDDOF, DTRACEHIOC_REMOVE
from common.limits import ParseLimits
from common.records import NotesLocation
from dtprobed.children.writer import StashWriterChild
from dtprobed.daemon.catchup import CatchUp, parse_environ
from dtprobed.daemon.receiver import Receiver
from dtprobed.stash.layout import XATTR_CAUGHT_UP
from tests.device.fake_cuse import in_process_receiver, served_device
from tests.device.fake_kernel import FakeCuseKernel, FakeMemory
from tests.integration.test_hostile_fetch import stuck_fuse
from tests.integration.test_sunw_dof import LIB, MAIN, Running, check_stash
from tests.support import sunw_dof as sd
from tests.support.daemon import REPO, DaemonHandle, finish, start_daemon
from tests.support.stash_view import file_key, generations

pytestmark = pytest.mark.timeout(600)

SUMMARY = "catch-up: "


@pytest.fixture(scope="module")
def objects() -> dict[str, sd.BuiltObject]:
    return {
        "exe": sd.build_or_fail(MAIN, "exe", "sunwexe"),
        "pie": sd.build_or_fail(MAIN, "pie", "sunwpie"),
        "lib": sd.build_or_fail(LIB, "lib", "libsunwlib.so"),
        "driver": sd.build_or_fail((), "pie", "sunwdriver"),
    }


def caught_up_gens(state_dir: Path, pid: int) -> set[int]:
    try:
        raw = os.getxattr(state_dir / "stash" / "dof-pid" / str(pid), XATTR_CAUGHT_UP)
    except OSError:
        return set()
    return {int(w) for w in raw.split()}


def summaries(daemon: DaemonHandle) -> list[str]:
    return [ln for ln in daemon.log_text().splitlines() if f"{SUMMARY}" in ln and "scanned" in ln]


def wait_summaries(daemon: DaemonHandle, count: int) -> str:
    daemon.wait_for(f"{count} catch-up summaries", lambda: len(summaries(daemon)) >= count, 120)
    return summaries(daemon)[count - 1]


class Programs:
    """Programs started for one test, all killed at its end."""

    def __init__(self, objects: dict[str, sd.BuiltObject]) -> None:
        self.objects = objects
        self.running: list[sd.SunwProgram] = []

    def start(self, kind: str, devname: Path | str, env: dict[str, str] | None = None) -> Running:
        obj = self.objects[kind]
        exe = self.objects["driver"] if kind == "lib" else obj
        prog = sd.SunwProgram.start(exe.path, devname=devname, env=env)
        self.running.append(prog)
        if kind == "lib":
            assert prog.command(f"o {obj.path}") == f"o {obj.path}"
        return Running(prog, obj)

    def stop_all(self) -> None:
        for prog in self.running:
            prog.kill()


@pytest.fixture
def programs(objects: dict[str, sd.BuiltObject]) -> Iterator[Programs]:
    progs = Programs(objects)
    try:
        yield progs
    finally:
        progs.stop_all()


# ------------------------------------------------------------------ the daemon starting


def test_start_up_registers_what_constructors_could_not(programs: Programs, tmp_path: Path) -> None:
    helper = tmp_path / "helper"  # nothing there yet: every constructor's open() fails
    other = tmp_path / "other-helper"
    other.write_bytes(b"")  # exists, but is not the helper the daemon will serve
    runs = {kind: programs.start(kind, helper) for kind in ("exe", "pie", "lib")}
    disabled = programs.start("pie", helper, env={"DTRACE_DOF_INIT_DISABLE": "1"})
    elsewhere = programs.start("pie", other)
    default = programs.start("pie", "/dev/dtrace/helper-none-here")
    for run in runs.values():
        info = run.info()
        assert (info["gen"], info["errno"]) == ("0", "2"), info  # ENOENT: no ioctl
    daemon = start_daemon(tmp_path, device=helper)
    try:
        line = wait_summaries(daemon, 1)
        assert "3 objects registered" in line, line
        for kind, run in runs.items():
            pid = run.prog.pid
            # what a live registration makes (dh, raw DOF, every parsed file), at gen 1
            check_stash(daemon, run, pid, 1)
            assert generations(daemon.state_dir, pid) == {1: file_key(run.obj.path)}, kind
            assert caught_up_gens(daemon.state_dir, pid) == {1}
            # the constructor's dof_helper_t is what the stash holds
            info = run.info()
            dh = run.obj.helper(run.base)
            assert (info["addr"], info["dof"]) == (
                hex(int.from_bytes(dh[64:72], "little")),
                hex(int.from_bytes(dh[72:80], "little")),
            )
        shown = json.loads(daemon.stash_cli("show", str(runs["pie"].prog.pid), "--json").stdout)
        assert [(m["generations"], m["caught_up"]) for m in shown["mappings"]] == [([1], [1])]
        assert "(caught up: 1)" in daemon.stash_cli("show", str(runs["pie"].prog.pid)).stdout
        for skipped in (disabled, elsewhere, default):
            assert skipped.prog.pid not in daemon.stash_pids()
        # (every other process of the machine names another helper too)
        assert "1 DTRACE_DOF_INIT_DISABLE" in line and "another helper" in line, line
        daemon.verify()
        # the same programs started now register live: the same files, at generation 0
        for kind, run in runs.items():
            live = programs.start(kind, helper)
            check_stash(daemon, live, live.prog.pid, 0)
            assert generations(daemon.state_dir, live.prog.pid) == {0: file_key(live.obj.path)}
            assert caught_up_gens(daemon.state_dir, live.prog.pid) == set()
            if kind == "exe":  # no ASLR for an ET_EXEC's addresses: byte-identical dh
                key = file_key(run.obj.path)
                a = daemon.state_dir / "stash" / "dof-pid" / str(run.prog.pid) / key
                b = daemon.state_dir / "stash" / "dof-pid" / str(live.prog.pid) / key
                assert (a / "dh").read_bytes() == (b / "dh").read_bytes()
                assert (a / "raw").read_bytes() == (b / "raw").read_bytes()
        # a second catch-up finds everything registered: nothing twice
        os.kill(daemon.pid, signal.SIGHUP)
        line = wait_summaries(daemon, 2)
        assert "0 objects registered" in line, line
        for run in runs.values():
            assert len(generations(daemon.state_dir, run.prog.pid)) == 1
        daemon.verify()
        # exit: the exit watcher prunes a caught-up process like any other
        pid = runs["pie"].prog.pid
        status, _err = runs["pie"].prog.quit()
        assert status == 0
        daemon.wait_for("exit pruning", lambda: pid not in daemon.stash_pids())
        daemon.verify()
    except BaseException:
        daemon.cleanup_hard()
        raise
    finish(daemon)


#: Maps FILE (of the stuck FUSE file system) r-x without touching it, as nobody, naming
#: the daemon's helper HELPER; then waits for stdin to close.
MAP_STUCK = r"""
import json, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size  # GETATTR: answered
text = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
print(json.dumps({"ready": True}), flush=True)
sys.stdin.read()
"""


def test_an_object_on_a_stalled_fuse_file_stalls_nothing(
    programs: Programs, tmp_path: Path
) -> None:
    """A user's process maps a file of its own FUSE file system, whose server never
    answers READ.  Before: catch-up opened it and read its ELF header on the maintenance
    thread, which then waited for ever (prune, reparse, catch-up stopped), and so did
    SIGTERM.  Now objects on FUSE file systems are never read by the daemon."""
    helper = tmp_path / "helper"
    benign = programs.start("pie", helper)
    with stuck_fuse(tmp_path / "stuck") as server:
        holder = subprocess.Popen(
            [sys.executable, "-c", MAP_STUCK, str(tmp_path / "stuck")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "DTRACE_DOF_INIT_DEVNAME": str(helper)},
        )
        try:
            assert holder.stdout is not None
            assert json.loads(holder.stdout.readline()) == {"ready": True}
            daemon = start_daemon(tmp_path, device=helper)
            try:
                line = wait_summaries(daemon, 1)
                assert "1 objects registered" in line, line
                assert "objects on FUSE file systems" in line, line
                check_stash(daemon, benign, benign.prog.pid, 1)
                assert holder.pid not in daemon.stash_pids()
                assert server.stdout is not None
                readable, _, _ = select.select([server.stdout], [], [], 0)
                assert not readable, "the daemon read the stalled file"  # no READ was sent
                daemon.verify()
                assert daemon.stop() == 0  # SIGTERM, within STOP_TIMEOUT
            except BaseException:
                daemon.cleanup_hard()
                raise
        finally:
            holder.kill()
            holder.wait()
    assert "Traceback" not in daemon.log_text()


def test_a_helper_path_on_a_stalled_fuse_file_stalls_nothing(
    programs: Programs, tmp_path: Path
) -> None:
    """A process names, as its helper, a file of a FUSE server that never answers
    GETATTR: the stat that tells whether that is our helper would wait for ever.  It
    runs in a child process, abandoned after a timeout: catch-up skips the process,
    registers the others, and the daemon still stops."""
    helper = tmp_path / "helper"
    benign = programs.start("pie", helper)
    with stuck_fuse(tmp_path / "stuck", withhold_getattr=True) as server:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            env={**os.environ, "DTRACE_DOF_INIT_DEVNAME": str(tmp_path / "stuck")},
        )
        try:
            daemon = start_daemon(tmp_path, device=helper)
            try:
                line = wait_summaries(daemon, 1)
                assert "1 objects registered" in line, line
                assert "helper path not answering" in line, line
                check_stash(daemon, benign, benign.prog.pid, 1)
                assert holder.pid not in daemon.stash_pids()
                assert server.stdout is not None
                assert "getattr" in json.loads(server.stdout.readline())  # it was asked
                daemon.verify()
                assert daemon.stop() == 0  # SIGTERM, within STOP_TIMEOUT
            except BaseException:
                daemon.cleanup_hard()
                raise
        finally:
            holder.kill()
            holder.wait()
    assert "Traceback" not in daemon.log_text()


def test_sigterm_right_after_ready_stops_the_daemon(tmp_path: Path) -> None:
    """SIGTERM as soon as the daemon is ready, while its start-up catch-up stats the
    helper: in FUSE mode that stat is a request to the daemon's own device.  Before:
    the main loop stopped serving, the stop waited for the catch-up, which waited for
    the stat: the daemon never stopped (seen in CI, about one start in 30).  Now a stop
    closes the device under a maintenance job that outlives a short wait."""
    for round_ in range(10):
        (tmp_path / f"round{round_}").mkdir()
        daemon = start_daemon(tmp_path / f"round{round_}")
        try:
            assert daemon.stop() == 0  # within STOP_TIMEOUT, or TimeoutExpired
        except BaseException:
            daemon.cleanup_hard()
            raise
        assert "Traceback" not in daemon.log_text()


def test_no_catch_up_then_sighup_and_the_subcommand(programs: Programs, tmp_path: Path) -> None:
    helper = tmp_path / "helper"
    first = programs.start("pie", helper)
    daemon = start_daemon(tmp_path, device=helper, extra_args=["--no-catch-up"])
    try:
        # no catch-up at start-up: nothing but what registers live
        assert first.prog.pid not in daemon.stash_pids()
        result = daemon.stash_cli("catch-up", "--timeout", "120")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 objects registered" in result.stdout, result.stdout
        check_stash(daemon, first, first.prog.pid, 1)
        # a program whose helper name resolves to ours only later: SIGHUP catches it up
        link = tmp_path / "later-helper"
        second = programs.start("exe", link)
        assert second.info()["errno"] == "2"
        link.symlink_to(helper)
        os.kill(daemon.pid, signal.SIGHUP)
        wait_summaries(daemon, 2)
        check_stash(daemon, second, second.prog.pid, 1)
        assert generations(daemon.state_dir, first.prog.pid) == {1: file_key(first.obj.path)}
        # --json: the completion marker itself
        result = daemon.stash_cli("catch-up", "--json")
        assert result.returncode == 0, result.stderr
        marker = json.loads(result.stdout)
        assert marker["registered"] == 0 and marker["already_registered"] >= 2, marker
        daemon.verify()
    except BaseException:
        daemon.cleanup_hard()
        raise
    finish(daemon)
    # the daemon is gone: the subcommand says so instead of signalling anything
    result = subprocess.run(
        [sys.executable, "-m", "dtprobed.cli.stash", "-s", str(daemon.state_dir), "catch-up"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 1 and "no daemon serves" in result.stderr, result.stderr


def test_live_registration_replaces_the_caught_up_one(programs: Programs, tmp_path: Path) -> None:
    """dlclose and dlopen again: the library's constructor registers it live, once."""
    helper = tmp_path / "helper"
    run = programs.start("lib", helper)
    pid = run.prog.pid
    daemon = start_daemon(tmp_path, device=helper)
    try:
        wait_summaries(daemon, 1)
        key = file_key(run.obj.path)
        assert generations(daemon.state_dir, pid) == {1: key}
        assert run.prog.command("c") == "c"  # its REMOVE faults in FUSE mode
        assert run.prog.command(f"o {run.obj.path}") == f"o {run.obj.path}"
        info = run.info()
        assert (info["gen"], info["errno"]) == ("2", "0"), info
        assert generations(daemon.state_dir, pid) == {2: key}  # gen 1 replaced, not doubled
        check_stash(daemon, run, pid, 2)
        daemon.verify()
        # a fork child re-registers live in its own directory; the parent is unchanged
        child = int(run.prog.command("k").split()[1])
        assert run.prog.expect(f"{child} ") == f"{child} ready"
        daemon.wait_for("the child's registration", lambda: child in daemon.stash_pids())
        assert generations(daemon.state_dir, child) == {0: key}
        assert caught_up_gens(daemon.state_dir, child) == set()
        assert generations(daemon.state_dir, pid) == {2: key}
        assert run.prog.command("w") == "w 0"
        daemon.verify()
    except BaseException:
        daemon.cleanup_hard()
        raise
    finish(daemon)


def test_dlclosed_caught_up_library_goes_at_the_next_prune(
    programs: Programs, tmp_path: Path
) -> None:
    """FUSE mode: the library's REMOVE(0) never arrives; the unmapped-objects prune drops it."""
    helper = tmp_path / "helper"
    main = programs.start("pie", helper)
    pid = main.prog.pid
    lib = Running(main.prog, programs.objects["lib"])
    assert main.prog.command(f"o {lib.obj.path}") == f"o {lib.obj.path}"
    daemon = start_daemon(tmp_path, device=helper, extra_args=["--prune-interval", "0.5"])
    try:
        wait_summaries(daemon, 1)
        main_key, lib_key = file_key(main.obj.path), file_key(lib.obj.path)
        assert generations(daemon.state_dir, pid) == {1: main_key, 2: lib_key}
        assert main.prog.command("c") == "c"
        daemon.wait_for(
            "the library's generation to go",
            lambda: generations(daemon.state_dir, pid) == {1: main_key},
            timeout=120,
        )
        # the generation symlink goes first (what a consumer sees); its probe files and
        # mapping directory follow in the same command, so look at the tree once it is done
        probes = daemon.state_dir / "probes" / str(pid)
        lib_providers = [probes / f"{pv.name}{pid}" for pv in lib.obj.providers]
        daemon.wait_for(
            "its mapping directory and probe files to go",
            lambda: (
                not (daemon.state_dir / "stash" / "dof-pid" / str(pid) / lib_key).exists()
                and not any(p.exists() for p in lib_providers)
            ),
        )
        check_stash(daemon, main, pid, 1)
        daemon.verify()
    except BaseException:
        daemon.cleanup_hard()
        raise
    finish(daemon)


def test_fork_child_started_before_the_daemon(programs: Programs, tmp_path: Path) -> None:
    helper = tmp_path / "helper"
    run = programs.start("exe", helper)
    child = int(run.prog.command("k").split()[1])
    assert run.prog.expect(f"{child} ") == f"{child} ready"
    daemon = start_daemon(tmp_path, device=helper)
    try:
        wait_summaries(daemon, 1)
        key = file_key(run.obj.path)
        # parent and child each caught up once, each in its own directory
        assert generations(daemon.state_dir, run.prog.pid) == {1: key}
        assert generations(daemon.state_dir, child) == {1: key}
        check_stash(daemon, Running(run.prog, run.obj), child, 1)
        assert run.prog.command("w") == "w 0"
        daemon.wait_for("the child's pruning", lambda: child not in daemon.stash_pids())
        daemon.verify()
    except BaseException:
        daemon.cleanup_hard()
        raise
    finish(daemon)


def test_marks_survive_a_restart_and_nothing_is_caught_up_twice(
    programs: Programs, tmp_path: Path
) -> None:
    helper = tmp_path / "helper"
    run = programs.start("pie", helper)
    pid, key = run.prog.pid, file_key(run.obj.path)
    daemon = start_daemon(tmp_path, device=helper)
    try:
        assert "1 objects registered" in wait_summaries(daemon, 1)
    except BaseException:
        daemon.cleanup_hard()
        raise
    finish(daemon)
    assert generations(daemon.state_dir, pid) == {1: key}  # the stash outlives the daemon
    again = start_daemon(tmp_path, device=helper, name="daemon2")
    try:
        line = wait_summaries(again, 1)
        assert "0 objects registered" in line, line
        assert generations(again.state_dir, pid) == {1: key}
        assert caught_up_gens(again.state_dir, pid) == {1}
        again.verify()
    except BaseException:
        again.cleanup_hard()
        raise
    finish(again)


def test_environment_parsing() -> None:
    env = b"A=1\0DTRACE_DOF_INIT_DEVNAME=/x\0DTRACE_DOF_INIT_DEVNAME=/y\0DTRACE_DOF_INIT_DISABLE=\0"
    assert parse_environ(env) == {
        b"DTRACE_DOF_INIT_DEVNAME": b"/x",  # first wins, as getenv()
        b"DTRACE_DOF_INIT_DISABLE": b"",  # set, even empty: drti tests for NULL only
    }
    assert parse_environ(b"DTRACE_DOF_INIT_DISABLEX=1\0NOEQUALS\0") == {}


# ------------------------------------------------- the scan itself, with exact interleavings


class Interleave:
    """The receiver as catch-up's registrar, with actions at exact points of the scan.

    ``before[pid]`` runs just before catch-up registers an object of *pid*, ``after[pid]``
    just after (before catch-up's own check that the process still maps it); everything
    else is the real receiver.
    """

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.before: dict[int, Callable[[], None]] = {}
        self.after: dict[int, Callable[[], None]] = {}

    def catch_up_locate(
        self, module: str, first_start: int, size: int, read: Callable[[int, int], bytes]
    ) -> NotesLocation:
        return self.receiver.catch_up_locate(module, first_start, size, read)

    def _around(self, pid: int, register: Callable[[], int]) -> int:
        if pid in self.before:
            self.before.pop(pid)()
        gen = register()
        if pid in self.after:
            self.after.pop(pid)()
        return gen

    def catch_up_notes(self, pid: int, address: int) -> int:
        return self._around(pid, lambda: self.receiver.catch_up_notes(pid, address))

    def catch_up_dof(
        self,
        pid: int,
        module: str,
        load_base: int,
        dof_addr: int,
        max_size: int,
        key: tuple[int, int],
    ) -> int:
        return self._around(
            pid,
            lambda: self.receiver.catch_up_dof(pid, module, load_base, dof_addr, max_size, key),
        )

    def remove_generation(self, pid: int, gen: int) -> bool:
        return self.receiver.remove_generation(pid, gen)


@dataclass
class Stack:
    """The daemon's receiver, children and exit watcher in this process; a fake CUSE kernel."""

    helper: Path  # a plain file the programs name: their ioctl gets ENOTTY (gen -1)
    state_dir: Path
    writer: StashWriterChild
    interleave: Interleave
    catch_up: CatchUp
    kernel: FakeCuseKernel

    def remove(self, pid: int, gen: int) -> int:
        """DTRACEHIOC_REMOVE(gen) from *pid*, as the CUSE kernel would deliver it."""
        return self.kernel.ioctl(pid, DTRACEHIOC_REMOVE, gen & 0xFFFFFFFF, FakeMemory())

    def adddof(self, pid: int, helper: bytes, dof_addr: int, dof: bytes) -> int:
        """DTRACEHIOC_ADDDOF from *pid*: the kernel copies its dof_helper_t and DOF in."""
        memory = FakeMemory()
        memory.map(HELPER_AT, helper)
        memory.map(dof_addr, dof)
        return self.kernel.ioctl(pid, DTRACEHIOC_ADDDOF, HELPER_AT, memory)

    def verify(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "dtprobed.cli.stash", "-s", str(self.state_dir), "verify"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def gens(self, pid: int) -> dict[int, str]:
        return generations(self.state_dir, pid)


HELPER_AT = 0x7F00_0000_1000  # where the fake kernel "copies" the dof_helper_t from


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    helper = tmp_path / "helper"
    helper.write_bytes(b"")
    state_dir = tmp_path / "run"
    state_dir.mkdir()
    with in_process_receiver(state_dir) as (receiver, writer):
        interleave = Interleave(receiver)
        catch_up = CatchUp(
            interleave,
            remover=writer,
            device=str(helper),
            state_dir=str(state_dir),
            max_dof_size=ParseLimits().max_dof_size,
        )
        receiver.ambiguous_remove = catch_up.on_ambiguous_remove
        with served_device(receiver.handle) as (kernel, _dev, _info):
            yield Stack(helper, state_dir, writer, interleave, catch_up, kernel)


def test_remove_zero_or_minus_one_removes_only_what_is_unmapped(
    programs: Programs, stack: Stack
) -> None:
    main = programs.start("pie", stack.helper)
    pid = main.prog.pid
    lib = Running(main.prog, programs.objects["lib"])
    assert main.prog.command(f"o {lib.obj.path}") == f"o {lib.obj.path}"
    assert (lib.info()["gen"], lib.info()["errno"]) == ("-1", "25")  # ENOTTY: no answer
    summary = stack.catch_up.run()
    assert summary.registered == 2, summary.line()
    main_key, lib_key = file_key(main.obj.path), file_key(lib.obj.path)
    assert stack.gens(pid) == {1: main_key, 2: lib_key}
    assert caught_up_gens(stack.state_dir, pid) == {1, 2}
    # what the destructors would send: both objects still mapped, nothing goes
    for gen in (-1, 0):
        assert stack.remove(pid, gen) == 0
    assert stack.gens(pid) == {1: main_key, 2: lib_key}
    # the library unmapped (its own REMOVE(-1) hit the plain file); a late REMOVE(-1)
    # removes exactly it, never the executable's generation
    assert main.prog.command("c") == "c"
    assert stack.remove(pid, -1) == 0
    assert stack.gens(pid) == {1: main_key}
    assert stack.remove(pid, 0) == 0
    assert stack.gens(pid) == {1: main_key}
    stack.verify()
    # an ordinary REMOVE of a real generation still works
    assert stack.remove(pid, 1) == 0
    assert stack.gens(pid) == {}
    stack.verify()


def test_exit_before_registration_leaves_nothing(programs: Programs, stack: Stack) -> None:
    run = programs.start("pie", stack.helper)
    pid = run.prog.pid

    def die() -> None:
        run.prog.proc.kill()
        run.prog.proc.wait(30)

    stack.interleave.before[pid] = die
    summary = stack.catch_up.run()
    assert pid not in stack.interleave.before, "the scan never reached the program"
    assert summary.skipped["objects refused"] >= 1, summary.line()
    assert stack.gens(pid) == {}
    assert not (stack.state_dir / "stash" / "dof-pid" / str(pid)).exists()
    stack.verify()


def test_exit_after_registration_is_pruned(programs: Programs, stack: Stack) -> None:
    run = programs.start("exe", stack.helper)
    pid = run.prog.pid

    def die() -> None:
        run.prog.proc.kill()
        run.prog.proc.wait(30)

    stack.interleave.after[pid] = die
    stack.catch_up.run()
    deadline = time.monotonic() + 30
    while (stack.state_dir / "stash" / "dof-pid" / str(pid)).exists():
        assert time.monotonic() < deadline, "not pruned after the exit"
        time.sleep(0.02)
    stack.verify()


def test_unmapped_during_registration_leaves_nothing(programs: Programs, stack: Stack) -> None:
    run = programs.start("lib", stack.helper)  # the driver: only the library has probes
    pid = run.prog.pid
    stack.interleave.after[pid] = lambda: run.prog.command("c") and None
    summary = stack.catch_up.run()
    assert summary.skipped["objects gone meanwhile"] == 1, summary.line()
    assert summary.registered == 0
    assert stack.gens(pid) == {}
    stack.verify()


def test_exec_during_registration_leaves_nothing(
    objects: dict[str, sd.BuiltObject], stack: Stack
) -> None:
    lib = objects["lib"].path
    code = (
        "import ctypes, os, sys; ctypes.CDLL(sys.argv[1]); print('ready', flush=True); "
        "sys.stdin.readline(); os.execv('/bin/sleep', ['sleep', '60'])"
    )
    # through a shell: a child of ours running our interpreter would count as the daemon's own
    proc = subprocess.Popen(
        ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", code, str(lib)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={"DTRACE_DOF_INIT_DEVNAME": str(stack.helper), "PATH": "/usr/bin:/bin"},
    )
    pid = 0
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"ready\n"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
        [pid] = [int(p) for p in children.split()]

        def exec_now() -> None:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            deadline = time.monotonic() + 30
            while os.readlink(f"/proc/{pid}/exe") != "/usr/bin/sleep":
                assert time.monotonic() < deadline, "no exec"
                time.sleep(0.01)

        stack.interleave.after[pid] = exec_now
        summary = stack.catch_up.run()
        assert pid not in stack.interleave.after, "the scan never reached the program"
        assert summary.skipped["objects gone meanwhile"] == 1, summary.line()
        assert stack.gens(pid) == {}
        stack.verify()
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(30)


def test_own_registration_during_the_scan_is_not_doubled(programs: Programs, stack: Stack) -> None:
    """The process's ADDDOF lands between catch-up's look at the stash and its registration."""
    run = programs.start("pie", stack.helper)
    pid, obj = run.prog.pid, run.obj
    info = run.info()
    dof_addr = int(info["dof"], 16)
    helper = obj.helper(run.base)
    dof = sd.read_memory(pid, dof_addr, len(obj.dof))
    answers: list[int] = []
    stack.interleave.before[pid] = lambda: answers.append(stack.adddof(pid, helper, dof_addr, dof))
    summary = stack.catch_up.run()
    assert answers == [0]  # its own registration: generation 0
    assert stack.gens(pid) == {0: file_key(obj.path)}  # catch-up got that one back
    assert caught_up_gens(stack.state_dir, pid) == set()
    assert summary.registered == 0 and summary.present >= 1, summary.line()
    # and the other order: caught up first, then its own registration replaces it
    other = programs.start("pie", stack.helper)
    summary = stack.catch_up.run()
    assert summary.registered == 1, summary.line()
    assert stack.gens(other.prog.pid) == {1: file_key(obj.path)}
    gen = stack.adddof(
        other.prog.pid,
        obj.helper(other.base),
        int(other.info()["dof"], 16),
        sd.read_memory(other.prog.pid, int(other.info()["dof"], 16), len(obj.dof)),
    )
    assert gen == 2
    assert stack.gens(other.prog.pid) == {2: file_key(obj.path)}
    stack.verify()
