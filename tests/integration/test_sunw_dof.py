"""Programs with ``.SUNW_dof`` (what ``dtrace -G`` <= 2.0.2 made), built by
:mod:`tests.support.sunw_dof`, registering through ADDDOF as old drti did.

First the objects themselves: the section, where it lies, its bytes in the running process,
what the sandboxed parser makes of them with the constructor's ``dof_helper_t``. Then the
registration through a private FUSE-mode daemon and the stash it leaves. Last, the real
dtrace 2.0.7 (sid chroot, ``tests/realdtrace/partner.py``) lists and fires the probes of
such a program running on the host, from our stash.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.dof_abi import DOF_HDR
from common.records import ArgsMap, ArgsNative, ArgsXlat
from tests.realdtrace import partner
from tests.support import sunw_dof as sd
from tests.support.daemon import REPO, DaemonHandle, finish, start_daemon
from tests.support.stash_view import file_key, generations, probe_files

pytestmark = pytest.mark.timeout(300)

MAIN = (
    sd.SunwProvider(
        "sunwmain",
        (
            sd.SunwProbe("tick", ("int", "uint64_t")),
            sd.SunwProbe("done-all", ("int",)),
            sd.SunwProbe("start", ("char *", "long"), sites=2, is_enabled=True),
        ),
    ),
    sd.SunwProvider("sunwaux", (sd.SunwProbe("bare"),)),
)
LIB = (
    sd.SunwProvider(
        "sunwlib", (sd.SunwProbe("call", ("int", "const char *")), sd.SunwProbe("enter"))
    ),
)
NOP_SITE = b"\x90" * sd.SITE_NOPS


@pytest.fixture(scope="module")
def objects() -> dict[str, sd.BuiltObject]:
    return {
        "exe": sd.build_or_fail(MAIN, "exe", "sunwexe"),
        "pie": sd.build_or_fail(MAIN, "pie", "sunwpie"),
        "lib": sd.build_or_fail(LIB, "lib", "libsunwlib.so"),
        "driver": sd.build_or_fail((), "pie", "sunwdriver"),  # no DOF: it dlopens the library
    }


class Running:
    """A started program and the object under test in it (for "lib": the driver's dlopen)."""

    def __init__(self, prog: sd.SunwProgram, obj: sd.BuiltObject) -> None:
        self.prog = prog
        self.obj = obj
        self.info_cmd = "li" if obj.kind == "lib" else "i"

    @property
    def base(self) -> int:
        return sd.load_base(self.prog.pid, self.obj.path)

    def info(self) -> dict[str, str]:
        return self.prog.info(self.info_cmd)

    def fire_cmd(self, probe: int, n: int) -> str:
        return f"{'l' if self.obj.kind == 'lib' else 'f'} {probe} {n}"


def start(
    objects: dict[str, sd.BuiltObject],
    kind: str,
    devname: Path | str,
    cpus: set[int] | None = None,
) -> Running:
    obj = objects[kind]
    exe = objects["driver"] if kind == "lib" else obj
    prog = sd.SunwProgram.start(exe.path, devname=devname, cpus=cpus)
    if kind == "lib":
        assert prog.command(f"o {obj.path}") == f"o {obj.path}"
    return Running(prog, obj)


def expected_tracepoints(obj: sd.BuiltObject, base: int) -> set[tuple[str, str, str, int, bool]]:
    """(provider, function, probe, run-time address, is-enabled) of every site."""
    return {
        (s.provider, s.func, s.probe, obj.relocated(s.addr, base), s.is_enabled) for s in obj.sites
    }


def expected_probes(obj: sd.BuiltObject) -> set[str]:
    """The stash's probe files, ``prv:mod:fun:prb``."""
    return {f"{s.provider}:{obj.name}:{s.func}:{s.probe}" for s in obj.sites}


KINDS = ["exe", "pie", "lib"]


# ------------------------------------------------------------------------ the objects


@pytest.mark.parametrize("kind", KINDS)
def test_section_is_what_old_dtrace_made(objects: dict[str, sd.BuiltObject], kind: str) -> None:
    obj = objects[kind]
    assert obj.elf_type == (sd.ET_EXEC if kind == "exe" else sd.ET_DYN)
    sec = sd.sections(obj.path)[".SUNW_dof"]
    assert sec == obj.dof_section
    assert "A" in sec.flags and "W" not in sec.flags and "X" not in sec.flags, sec
    assert sec.align == 8 and sec.addr % 8 == 0
    # allocated in a read-only LOAD segment, and the file holds all of it (no .bss tail)
    segs = [seg for seg in sd.load_segments(obj.path) if seg.holds(sec.addr, sec.size)]
    assert len(segs) == 1, segs
    assert segs[0].flags == "R", segs[0]
    dof = obj.dof
    assert sd.file_bytes_at(obj.path, sec.addr, sec.size) == dof
    ident, flags, *_rest, loadsz, _filesz, _pad = DOF_HDR.unpack_from(dof)
    assert ident[:4] == b"\x7fDOF" and flags == 0
    assert loadsz == sec.size == len(dof)
    assert ident[6] == (3 if any(s.is_enabled for s in obj.sites) else 2)  # DOF version
    # __SUNW_dof, what the constructor passes as dofhp_dof, is the section's start
    assert sd.nm_symbols(obj.path)["__SUNW_dof"] == sec.addr
    # every site is the nop sequence, at its label, inside the text segment
    text = [seg for seg in sd.load_segments(obj.path) if "E" in seg.flags]
    for site in obj.sites:
        assert sd.file_bytes_at(obj.path, site.addr, sd.SITE_NOPS) == NOP_SITE, site
        assert any(seg.holds(site.addr, sd.SITE_NOPS) for seg in text), site


def test_builds_are_cached(objects: dict[str, sd.BuiltObject]) -> None:
    again = sd.build_sunw_object(MAIN, kind="pie", name="sunwpie")
    assert again.path == objects["pie"].path
    assert again.sites == objects["pie"].sites
    assert again.path.parent.parent == sd.cache_dir()


@pytest.mark.parametrize("kind", KINDS)
def test_dof_in_memory_and_parsed_tracepoints(
    objects: dict[str, sd.BuiltObject], kind: str, tmp_path: Path
) -> None:
    """No helper there: the constructor fails to open it, and leaves its dof_helper_t."""
    run = start(objects, kind, tmp_path / "no-such-helper")
    try:
        obj, base = run.obj, run.base
        if kind == "exe":
            assert base == min(seg.vaddr for seg in sd.load_segments(obj.path))
        info = run.info()
        assert info == {
            "gen": "0",
            "errno": "2",  # ENOENT from open(): no ioctl
            "regs": "1",
            "mod": obj.name,
            "addr": hex(base if kind != "exe" else 0),
            "dof": hex(obj.relocated(obj.dof_section.addr, base)),  # type: ignore[union-attr]
        }
        memory = sd.read_memory(run.prog.pid, int(info["dof"], 16), len(obj.dof))
        assert memory == obj.dof
        # the sandboxed parser on those bytes, with that dof_helper_t
        (tmp_path / "dof").write_bytes(memory)
        (tmp_path / "dh").write_bytes(obj.helper(base))
        proc = subprocess.run(
            [sys.executable, "-m", "dtprobed.cli.parse", "--json", "--helper", "dh", "dof"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        got: set[tuple[str, str, str, int, bool]] = set()
        provider = ""
        probe: dict[str, object] = {}
        for rec in map(json.loads, proc.stdout.splitlines()):
            if rec["type"] == "provider":
                provider = rec["name"]
            elif rec["type"] == "probe":
                probe = rec
                assert rec["mod"] == obj.name
            elif rec["type"] == "args_native":
                _, sunw_probe = obj.probe(
                    next(s.index for s in obj.sites if s.func == probe["fun"])
                )
                assert rec["args"] == list(sunw_probe.args)
            elif rec["type"] == "tracepoint":
                fun, prb = str(probe["fun"]), str(probe["prb"])
                got.add((provider, fun, prb, rec["addr"], rec["is_enabled"]))
        assert got == expected_tracepoints(obj, base)
        for *_, addr, _is_enabled in got:
            assert sd.read_memory(run.prog.pid, addr, sd.SITE_NOPS) == NOP_SITE, hex(addr)
    finally:
        status, err = run.prog.quit()
    assert status == 0, err
    assert f"failed to open helper device {tmp_path}/no-such-helper" in err


def test_disable_env_keeps_the_constructor_quiet(
    objects: dict[str, sd.BuiltObject], daemon: DaemonHandle
) -> None:
    prog = sd.SunwProgram.start(
        objects["pie"].path, devname=daemon.device, env={"DTRACE_DOF_INIT_DISABLE": "1"}
    )
    try:
        # the constructor has run (and returned) before main prints "ready"
        assert prog.info() == {
            "gen": "0", "errno": "0", "regs": "0", "mod": "-", "addr": "0x0", "dof": "0x0",
        }  # fmt: skip
        assert prog.pid not in daemon.stash_pids()
    finally:
        status, _err = prog.quit()
    assert status == 0


# ------------------------------------------------------------------- through the daemon


def check_stash(daemon: DaemonHandle, run: Running, pid: int, gen: int) -> None:
    obj, base = run.obj, run.base
    key = file_key(obj.path)
    assert generations(daemon.state_dir, pid).get(gen) == key
    files = {k: v for k, v in probe_files(daemon.state_dir, pid).items() if f":{obj.name}:" in k}
    assert set(files) == expected_probes(obj)
    got = set()
    for name, pf in files.items():
        prv, mod, fun, prb = name.split(":")
        assert (pf.probe.mod, pf.probe.fun, pf.probe.prb) == (mod, fun, prb)
        assert pf.provider.name == prv
        _, sunw_probe = obj.probe(next(s.index for s in obj.sites if s.func == fun))
        args = list(sunw_probe.args)
        expect_args = (
            [ArgsNative(args=args), ArgsXlat(args=args), ArgsMap(map=list(range(len(args))))]
            if args
            else []
        )
        assert pf.args == expect_args, name
        got |= {(prv, fun, prb, tp.addr, tp.is_enabled) for tp in pf.tracepoints}
    assert got == expected_tracepoints(obj, base)
    mapping = daemon.state_dir / "stash" / "dof-pid" / str(pid) / key
    raw = (mapping / "raw").read_bytes()
    assert raw[:8] == bytes(8) and raw[8:] == obj.dof  # base 0, then the section's bytes
    assert (mapping / "dh").read_bytes() == obj.helper(base)


@pytest.mark.parametrize("kind", KINDS)
def test_registers_through_the_daemon(
    objects: dict[str, sd.BuiltObject], daemon: DaemonHandle, kind: str
) -> None:
    run = start(objects, kind, daemon.device)
    pid = run.prog.pid
    try:
        info = run.info()
        assert (info["gen"], info["errno"], info["regs"]) == ("0", "0", "1"), info
        check_stash(daemon, run, pid, 0)
        assert sorted(generations(daemon.state_dir, pid)) == [0]
        daemon.verify()
        # the sites still run (nothing was patched in)
        assert run.prog.command(run.fire_cmd(0, 2)) == run.fire_cmd(0, 2)
    finally:
        status, err = run.prog.quit()
    assert status == 0, err
    assert "ioctl succeeded for DOF at" in err
    # FUSE mode: REMOVE (by value) faults in the kernel and never reaches the daemon
    assert "ioctl failed to remove DOF (gen 0): Bad address" in err
    daemon.wait_for("exit pruning", lambda: pid not in daemon.stash_pids())
    daemon.verify()


def test_executable_and_library_two_generations(
    objects: dict[str, sd.BuiltObject], daemon: DaemonHandle
) -> None:
    main = Running(sd.SunwProgram.start(objects["pie"].path, devname=daemon.device), objects["pie"])
    pid = main.prog.pid
    lib = Running(main.prog, objects["lib"])
    try:
        assert main.prog.command(f"o {lib.obj.path}").startswith("o ")
        assert lib.info()["gen"] == "1"
        check_stash(daemon, main, pid, 0)
        check_stash(daemon, lib, pid, 1)
        assert sorted(generations(daemon.state_dir, pid)) == [0, 1]
        daemon.verify()
        assert main.prog.command("c") == "c"
        # FUSE mode: the library's REMOVE never arrives; gen 1 stays until the next
        # periodic prune (60 s here; tests/integration/test_unmapped.py) or the exit
        assert sorted(generations(daemon.state_dir, pid)) == [0, 1]
        daemon.verify()
    finally:
        status, err = main.prog.quit()
    assert status == 0, err
    assert "ioctl failed to remove DOF (gen 1): Bad address" in err
    assert "ioctl failed to remove DOF (gen 0): Bad address" in err
    daemon.wait_for("exit pruning", lambda: pid not in daemon.stash_pids())


def test_fork_child_registers_again(
    objects: dict[str, sd.BuiltObject], daemon: DaemonHandle
) -> None:
    run = start(objects, "exe", daemon.device)
    try:
        child = int(run.prog.command("k").split()[1])
        assert run.prog.expect(f"{child} ") == f"{child} ready"
        assert run.prog.command("> i") == ">"
        answer = run.prog.expect(f"{child} ok i ").split()[3:]
        info = dict(kv.split("=", 1) for kv in answer)
        # the pthread_atfork child handler ran: a second ADDDOF, in the child, its own gen 0
        assert (info["gen"], info["errno"], info["regs"]) == ("0", "0", "2"), info
        assert generations(daemon.state_dir, child) == generations(daemon.state_dir, run.prog.pid)
        check_stash(daemon, Running(run.prog, run.obj), child, 0)
        assert run.prog.command("w") == "w 0"
        daemon.wait_for("the child's pruning", lambda: child not in daemon.stash_pids())
        assert run.prog.pid in daemon.stash_pids()
        daemon.verify()
    finally:
        status, err = run.prog.quit()
    assert status == 0, err


# ------------------------------------------------------------------- the real dtrace 2.0.7


@pytest.fixture(scope="module")
def chroot() -> Path:
    try:
        return partner.ensure_chroot()
    except partner.PartnerError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="module")
def real(chroot: Path, objects: dict[str, sd.BuiltObject]) -> Iterator[DaemonHandle]:
    """A daemon whose helper, state directory and objects the chroot sees at their paths."""
    with tempfile.TemporaryDirectory(prefix="sunw-rdt.", dir="/dev/shm") as tmp:
        handle = start_daemon(Path(tmp))
        try:
            binds: list[str | Path] = [tmp, handle.device, sd.cache_dir()]
            with partner.mounted(root=chroot, binds=binds):
                yield handle
        except partner.PartnerError as err:
            handle.cleanup_hard()
            pytest.fail(str(err), pytrace=False)
        except BaseException:
            handle.cleanup_hard()
            raise
        finish(handle)


#: The real-dtrace targets run on one CPU: dtrace prints its per-CPU buffers one CPU after
#: the other, so only then is the order of its output the order of the firings (seen: a
#: fork child's "done" printed before its "tick"s, which had run on the other CPU).
ONE_CPU = {min(os.sched_getaffinity(0))}

#: dtrace waits this long at most for the script's own exit(0) (it normally comes first).
FIRE_WINDOW = 240.0


def listed(daemon: DaemonHandle, chroot: Path, pattern: str) -> set[tuple[str, str, str, str]]:
    rows = partner.dtrace_list(daemon.state_dir, pattern, root=chroot).rows
    return {(r.provider, r.module, r.function, r.name) for r in rows}


def shown(out: partner.FireResult) -> str:
    """All of dtrace's output, for a failure message."""
    return f"dtrace exit {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"


def expected_rows(obj: sd.BuiltObject, pid: int) -> set[tuple[str, str, str, str]]:
    return {(f"{s.provider}{pid}", obj.name, s.func, s.probe) for s in obj.sites}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["exe", "pie"])
def test_real_dtrace_lists_and_fires(
    objects: dict[str, sd.BuiltObject], real: DaemonHandle, chroot: Path, kind: str
) -> None:
    run = start(objects, kind, real.device, ONE_CPU)
    pid = run.prog.pid
    try:
        assert run.info()["gen"] == "0"
        assert listed(real, chroot, f"sunw*{pid}") == expected_rows(run.obj, pid)
        # Regular sites only: an enabling that includes the is-enabled site (function
        # sunwmain_start_enabled) cannot load its BPF program on this locked-down kernel.
        script = (
            'sunwmain$target:::tick { printf("tick %d %u\\n", args[0], args[1]); }'
            ' sunwmain$target::sunwmain_start:start { printf("start %s %d\\n",'
            " copyinstr(arg0), args[1]); }"
            ' sunwaux$target:::bare { printf("bare\\n"); @bare = count(); }'
            ' sunwmain$target:::done-all { printf("done %d\\n", args[0]); exit(0); }'
            ' END { printa("bare %@d\\n", @bare); }'
        )

        def trigger() -> None:
            for cmd in ("f 2 2", "f 0 3", "f 3 4", "f 1 1"):
                assert run.prog.command(cmd) == cmd

        out = partner.dtrace_fire(
            real.state_dir, script, pid, trigger=trigger, duration=FIRE_WINDOW, root=chroot
        )
        lines = [ln for ln in out.stdout.splitlines() if ln]
        assert lines == [
            *["start start 1"] * 2,  # two sites, i = 0: arg1 = 0 * 1000 + 1
            *["start start 1001"] * 2,
            "tick 0 1",
            "tick 1000 1001",
            "tick 2000 2001",
            *["bare"] * 4,
            "done 0",
            "bare 4",
        ], shown(out)
        assert out.returncode == 0, shown(out)
        # the brief's one-liner: trace(arg0) on one probe
        out = partner.dtrace_fire(
            real.state_dir,
            "sunwmain$target:::tick { trace(arg0); } sunwmain$target:::done-all { exit(0); }",
            pid,
            trigger=lambda: (run.prog.command("f 0 2"), run.prog.command("f 1 1")),
            duration=FIRE_WINDOW,
            quiet=False,
            root=chroot,
        )
        # not quiet: "CPU ID FUNCTION:NAME VALUE" per firing, and what each clause matched
        traced = [ln.split() for ln in out.stdout.splitlines() if "sunwmain_tick:tick" in ln]
        assert [words[-1] for words in traced] == ["0", "1000"], shown(out)
        assert out.matched == 2, shown(out)  # tick and done-all: one probe each
    finally:
        status, err = run.prog.quit()
    assert status == 0, err
    real.wait_for("exit pruning", lambda: pid not in real.stash_pids() + real.probe_pids())
    assert listed(real, chroot, "sunw*") & expected_rows(run.obj, pid) == set()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_dtrace_fires_a_dlopened_library(
    objects: dict[str, sd.BuiltObject], real: DaemonHandle, chroot: Path
) -> None:
    run = start(objects, "lib", real.device, ONE_CPU)
    pid = run.prog.pid
    try:
        assert run.info()["gen"] == "0"  # the driver has no DOF of its own
        assert listed(real, chroot, f"sunw*{pid}") == expected_rows(run.obj, pid)

        def trigger() -> None:
            assert run.prog.command("l 0 3") == "l 0 3"
            assert run.prog.command("l 1 1") == "l 1 1"

        out = partner.dtrace_fire(
            real.state_dir,
            'sunwlib$target:::call { printf("call %d %s\\n", args[0], copyinstr(arg1));'
            " @n = count(); }"
            " sunwlib$target:::enter { exit(0); }"
            ' END { printa("calls %@d\\n", @n); }',
            pid,
            trigger=trigger,
            duration=FIRE_WINDOW,
            root=chroot,
        )
        assert [ln for ln in out.stdout.splitlines() if ln] == [
            "call 0 call",
            "call 1000 call",
            "call 2000 call",
            "calls 3",
        ], shown(out)
    finally:
        status, err = run.prog.quit()
    assert status == 0, err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_dtrace_fires_in_a_fork_child(
    objects: dict[str, sd.BuiltObject], real: DaemonHandle, chroot: Path
) -> None:
    run = start(objects, "pie", real.device, ONE_CPU)
    try:
        child = int(run.prog.command("k").split()[1])
        assert run.prog.expect(f"{child} ") == f"{child} ready"
        # registered again by the atfork handler before the child printed "ready"
        assert sorted(generations(real.state_dir, child)) == [0]
        assert listed(real, chroot, f"sunwmain{child}") == {
            row for row in expected_rows(run.obj, child) if row[0] == f"sunwmain{child}"
        }

        def trigger() -> None:
            for cmd in ("f 0 2", "f 1 1"):
                assert run.prog.command(f"> {cmd}") == ">"
                assert run.prog.expect(f"{child} ") == f"{child} ok {cmd}"

        out = partner.dtrace_fire(
            real.state_dir,
            'sunwmain$target:::tick { printf("tick %d %d %d\\n", pid, args[0], args[1]); }'
            ' sunwmain$target:::done-all { printf("done %d\\n", pid); exit(0); }',
            child,
            trigger=trigger,
            duration=FIRE_WINDOW,
            root=chroot,
        )
        assert [ln for ln in out.stdout.splitlines() if ln] == [
            f"tick {child} 0 1",
            f"tick {child} 1000 1001",
            f"done {child}",
        ], shown(out)
        assert run.prog.command("w") == "w 0"
    finally:
        status, err = run.prog.quit()
    assert status == 0, err
