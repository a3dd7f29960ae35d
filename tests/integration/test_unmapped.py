"""Unmapped objects: the periodic prune drops the generations of what a process unmapped.

In FUSE mode a ``dlclose()``'s REMOVE never reaches the daemon (the kernel fails the
by-value ioctl with EFAULT), so without this a closed library's probes stay until its
process exits. Each test runs a private daemon with a short ``--prune-interval``, waits
for prunes by their DEBUG line (``periodic prune done``) rather than for a time, and
checks both halves: what is still mapped stays over several prunes, what was unmapped is
gone after the next one, and ``dtprobed-stash verify`` passes.

* DOF in an ELF object (``.SUNW_dof``, :mod:`tests.support.sunw_dof`): a PIE with probes
  dlopens a library with probes, dlcloses it;
* anonymous DOF (libusdt-style: DOF in anonymous memory, ``dofhp_addr = dofhp_dof``,
  tracepoints in an executable mapping of an unlinked file): freeing the DOF buffer keeps
  the registration, unmapping the tracepoint code drops it;
* notes (``.note.usdt``, built by the real dtrace 2.0.7 in the sid chroot): the same
  dlopen/dlclose, and the real ``dtrace -l`` lists the main program's probes after it;
* the decision's safety rules on a stash tree made by hand for a real ``sleep`` process
  (its start time and exec token in the xattrs): another process of that pid, another
  image, a directory without our xattrs (upstream's) and a dead process are left alone,
  and the re-check before removal fails once a generation names another mapping.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from dtprobed.daemon.identity import AddressSpace
from dtprobed.daemon.unmapped import find_unmapped
from dtprobed.oslib.procfs import current_exec_token, stat_of
from dtprobed.stash.layout import XATTR_EXEC_TOKEN, XATTR_START_TIME
from tests.realdtrace import partner
from tests.support import sunw_dof as sd
from tests.support.daemon import REPO, DaemonHandle, finish, start_daemon
from tests.support.stash_view import file_key, generations, probe_files

pytestmark = pytest.mark.timeout(300)

#: Short, so a test waits a few seconds for its prunes (never asserted as a time).
PRUNE = "0.2"
PRUNE_LINE = "periodic prune done"
#: How many prunes an object that is still mapped must survive in these tests.
SURVIVE = 3

MAIN = (sd.SunwProvider("unmapmain", (sd.SunwProbe("tick", ("int",)), sd.SunwProbe("bare"))),)
LIB = (sd.SunwProvider("unmaplib", (sd.SunwProbe("call", ("int", "const char *")),)),)


@pytest.fixture(scope="module")
def objects() -> dict[str, sd.BuiltObject]:
    return {
        "pie": sd.build_or_fail(MAIN, "pie", "unmappie"),
        "lib": sd.build_or_fail(LIB, "lib", "libunmap.so"),
    }


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonHandle]:
    handle = start_daemon(tmp_path, extra_args=["--prune-interval", PRUNE])
    try:
        yield handle
    except BaseException:
        handle.cleanup_hard()
        raise
    finish(handle)


def prunes(daemon: DaemonHandle) -> int:
    return daemon.log_text().count(PRUNE_LINE)


def wait_prunes(daemon: DaemonHandle, n: int) -> None:
    """Wait until *n* more periodic prunes have finished (each logs one DEBUG line)."""
    target = prunes(daemon) + n
    daemon.wait_for(f"{n} periodic prunes", lambda: prunes(daemon) >= target, timeout=120)


def mapping_dirs(daemon: DaemonHandle, pid: int) -> set[str]:
    d = daemon.state_dir / "stash" / "dof-pid" / str(pid)
    return (
        {p.name for p in d.iterdir() if p.is_dir() and not p.is_symlink()} if d.exists() else set()
    )


def test_dlclosed_library_goes_main_program_stays(
    objects: dict[str, sd.BuiltObject], daemon: DaemonHandle
) -> None:
    pie, lib = objects["pie"], objects["lib"]
    prog = sd.SunwProgram.start(pie.path, devname=daemon.device)
    pid = prog.pid
    main_probes = {
        "unmapmain:unmappie:unmapmain_tick:tick",
        "unmapmain:unmappie:unmapmain_bare:bare",
    }
    lib_probe = "unmaplib:libunmap.so:unmaplib_call:call"
    try:
        assert prog.command(f"o {lib.path}") == f"o {lib.path}"
        assert prog.info("li")["gen"] == "1"
        assert generations(daemon.state_dir, pid) == {0: file_key(pie.path), 1: file_key(lib.path)}
        wait_prunes(daemon, SURVIVE)
        # both objects mapped: nothing dropped, however many prunes ran
        assert sorted(generations(daemon.state_dir, pid)) == [0, 1]
        assert set(probe_files(daemon.state_dir, pid)) == main_probes | {lib_probe}
        assert "no longer mapped" not in daemon.log_text()

        assert prog.command("c") == "c"  # dlclose: its REMOVE fails with EFAULT in the kernel
        dropped = (
            f"{pid}: libunmap.so ({file_key(lib.path)}) is no longer mapped: dropped generation 1"
        )
        # logged once the writer's Remove is done (its symlink goes first, then the rest)
        daemon.wait_for("the library's drop", lambda: dropped in daemon.log_text(), timeout=120)
        assert sorted(generations(daemon.state_dir, pid)) == [0]
        assert set(probe_files(daemon.state_dir, pid)) == main_probes
        assert mapping_dirs(daemon, pid) == {file_key(pie.path)}
        daemon.verify()
        # the main program's probes still fire and stay over more prunes
        assert prog.command("f 0 2") == "f 0 2"
        wait_prunes(daemon, SURVIVE)
        assert generations(daemon.state_dir, pid) == {0: file_key(pie.path)}

        # dlopen again: a new generation (never a reused one), kept while mapped
        assert prog.command(f"o {lib.path}") == f"o {lib.path}"
        assert prog.info("li")["gen"] == "2"
        wait_prunes(daemon, SURVIVE)
        assert sorted(generations(daemon.state_dir, pid)) == [0, 2]
        assert set(probe_files(daemon.state_dir, pid)) == main_probes | {lib_probe}
        daemon.verify()
    finally:
        status, err = prog.quit()
    assert status == 0, err
    assert "ioctl failed to remove DOF (gen 1): Bad address" in err  # the REMOVE never came
    daemon.wait_for("exit pruning", lambda: pid not in daemon.stash_pids())
    daemon.verify()


# ------------------------------------------------------------------ anonymous DOF (libusdt)

#: libusdt-style process: for each registration, maps its tracepoint code from a file and
#: unlinks the file (libusdt's probe code comes from an unlinked temporary file), copies
#: the DOF into anonymous memory and sends ADDDOF with dofhp_addr = dofhp_dof = the DOF's
#: address. Prints {"pid", "gens"}; then commands on stdin: "code I" unmaps registration
#: I's code, "dof I" unmaps its DOF buffer (each answered {"ok": ...}); end of input exits.
ANON_CLIENT = r"""
import ctypes, fcntl, json, mmap, os, struct, sys
from common.ioctl import DTRACEHIOC_ADDDOF
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
FIXED = 0x100000  # MAP_FIXED_NOREPLACE
device, regs = sys.argv[1], json.loads(sys.argv[2])

def mapped(addr, size, prot, flags, fd):
    got = libc.mmap(addr, size, prot, flags | FIXED, fd, 0)
    if got != addr:
        raise OSError(ctypes.get_errno(), f"mmap at {addr:#x}")
    return got

gens = []
for r in regs:
    fd = os.open(r["code_file"], os.O_RDONLY)
    mapped(r["code_addr"], r["code_size"], mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_PRIVATE, fd)
    os.close(fd)
    os.unlink(r["code_file"])
    dof = open(r["dof_file"], "rb").read()
    size = (len(dof) + 4095) & ~4095
    mapped(r["dof_addr"], size, mmap.PROT_READ | mmap.PROT_WRITE,
           mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)
    ctypes.memmove(r["dof_addr"], dof, len(dof))
    r["dof_size"] = size
    helper = bytearray(r["mod"].encode().ljust(64, b"\0") + struct.pack("<QQ", r["dof_addr"], r["dof_addr"]))
    dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        gens.append(fcntl.ioctl(dev, DTRACEHIOC_ADDDOF, helper, True))
    finally:
        os.close(dev)
print(json.dumps({"pid": os.getpid(), "gens": gens}), flush=True)
for line in sys.stdin:
    what, index = line.split()
    r = regs[int(index)]
    if what == "code":
        ok = libc.munmap(r["code_addr"], r["code_size"]) == 0
    else:
        ok = libc.munmap(r["dof_addr"], r["dof_size"]) == 0
    print(json.dumps({"ok": ok}), flush=True)
"""
CODE_SIZE = 1 << 16
#: Fixed addresses (the DOF must name its tracepoints before the client starts); each DOF
#: lies below its code, so dofpr_addr > dofhp_addr and the parser's relocation leaves it.
ANON_REGS: tuple[dict[str, Any], ...] = (
    {"mod": "anonfirst", "code_addr": 0x6_0000_0000, "dof_addr": 0x5_0000_0000},
    {"mod": "anonsecond", "code_addr": 0x6_1000_0000, "dof_addr": 0x5_1000_0000},
)


class AnonClient:
    def __init__(self, device: Path, tmp: Path) -> None:
        regs: list[dict[str, Any]] = []
        for i, base in enumerate(ANON_REGS):
            code = tmp / f"anoncode{i}"
            code.write_bytes(b"\x90" * (CODE_SIZE - 1) + b"\xc3")
            probe = ProbeSpec(
                func="fire", name=f"probe{i}", offsets=[0x10, 0x20], addr=base["code_addr"] + 0x100
            )
            dof = tmp / f"anon{i}.dof"
            dof.write_bytes(build_dof([ProviderSpec(f"anonprov{i}", [probe])]).data)
            regs.append(
                {**base, "code_file": str(code), "code_size": CODE_SIZE, "dof_file": str(dof)}
            )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ANON_CLIENT, str(device), json.dumps(regs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        hello = self.read()
        self.pid: int = hello["pid"]
        self.gens: list[int] = hello["gens"]

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, "the anonymous-DOF client did not answer"
        line = self.proc.stdout.readline()
        assert line, f"the anonymous-DOF client exited ({self.proc.wait()})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def unmap(self, what: str, index: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{what} {index}\n")
        self.proc.stdin.flush()
        assert self.read() == {"ok": True}

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(60)


def anon_key(index: int) -> str:
    return f"0-{ANON_REGS[index]['dof_addr']}"


def test_anonymous_dof_goes_with_its_code_not_with_its_buffer(
    daemon: DaemonHandle, tmp_path: Path
) -> None:
    client = AnonClient(daemon.device, tmp_path)
    pid = client.pid
    try:
        assert client.gens == [0, 1]
        assert generations(daemon.state_dir, pid) == {0: anon_key(0), 1: anon_key(1)}
        # libusdt may free its DOF once registered: that is not an unmapping of the probes
        client.unmap("dof", 1)
        client.unmap("dof", 0)
        wait_prunes(daemon, SURVIVE)
        assert generations(daemon.state_dir, pid) == {0: anon_key(0), 1: anon_key(1)}
        assert "no longer mapped" not in daemon.log_text()

        client.unmap("code", 0)  # the first provider's tracepoints are gone
        dropped = f"{pid}: anonfirst ({anon_key(0)}) is no longer mapped: dropped generation 0"
        daemon.wait_for("the first registration's drop", lambda: dropped in daemon.log_text(), 120)
        assert sorted(generations(daemon.state_dir, pid)) == [1]
        assert set(probe_files(daemon.state_dir, pid)) == {"anonprov1:anonsecond:fire:probe1"}
        assert mapping_dirs(daemon, pid) == {anon_key(1)}
        daemon.verify()
        wait_prunes(daemon, SURVIVE)
        assert generations(daemon.state_dir, pid) == {1: anon_key(1)}

        client.unmap("code", 1)  # the last one: the process directory goes with it
        daemon.wait_for(
            "the process to leave the stash",
            lambda: pid not in daemon.stash_pids() + daemon.probe_pids(),
            timeout=120,
        )
        daemon.verify()
    finally:
        status = client.close()
    assert status == 0


# ------------------------------------------------------------ notes (the real dtrace 2.0.7)


@pytest.fixture(scope="module")
def root() -> Path:
    return partner.ensure_chroot()


@pytest.fixture(scope="module")
def progs(root: Path) -> partner.Programs:
    return partner.build_programs(root)


@pytest.fixture
def chroot_daemon(root: Path) -> Iterator[DaemonHandle]:
    with tempfile.TemporaryDirectory(prefix="unmapped.", dir="/dev/shm") as tmp:
        handle = start_daemon(Path(tmp), extra_args=["--prune-interval", PRUNE])
        try:
            with partner.mounted(root=root, binds=[tmp, handle.device]):
                yield handle
        except BaseException:
            handle.cleanup_hard()
            raise
        finish(handle)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_notes_library_dlclosed(
    chroot_daemon: DaemonHandle, root: Path, progs: partner.Programs
) -> None:
    daemon = chroot_daemon
    prog = partner.Program.start(progs.usdtprog, devname=daemon.device, root=root)
    pid = prog.pid
    main = {
        (f"rdtmain{pid}", "usdtprog", "fire_ticks", "tick"),
        (f"rdtmain{pid}", "usdtprog", "fire_ticks", "done-all"),
        (f"rdtmain{pid}", "usdtprog", "serve", "start"),
        (f"rdtmain{pid}", "usdtprog", "serve", "tick"),
    }
    lib = {
        (f"rdtlib{pid}", "libusdtlib.so", "rdtlib_fire", "enter"),
        (f"rdtlib{pid}", "libusdtlib.so", "rdtlib_fire", "call"),
    }

    def listed() -> set[tuple[str, str, str, str]]:
        rows = partner.dtrace_list(daemon.state_dir, f"rdt*{pid}", root=root).rows
        return {(r.provider, r.module, r.function, r.name) for r in rows}

    try:
        daemon.wait_for("registration", lambda: len(generations(daemon.state_dir, pid)) == 1)
        assert prog.command("o").startswith("o /")
        daemon.wait_for("the library", lambda: len(generations(daemon.state_dir, pid)) == 2)
        lib_key = generations(daemon.state_dir, pid)[1]
        assert lib_key == file_key(progs.libusdtlib)
        wait_prunes(daemon, SURVIVE)
        assert sorted(generations(daemon.state_dir, pid)) == [0, 1]
        assert listed() == main | lib

        assert prog.command("c") == "c"
        dropped = f"{pid}: libusdtlib.so ({lib_key}) is no longer mapped: dropped generation 1"
        daemon.wait_for("the library's drop", lambda: dropped in daemon.log_text(), timeout=120)
        assert sorted(generations(daemon.state_dir, pid)) == [0]
        assert not (daemon.state_dir / "probes" / str(pid) / f"rdtlib{pid}").exists()
        daemon.verify()
        assert listed() == main
    finally:
        status, err = prog.quit()
    assert status == 0, err
    daemon.wait_for("exit pruning", lambda: pid not in daemon.stash_pids(), timeout=120)
    daemon.verify()


def test_prune_interval_is_an_option(tmp_path: Path) -> None:
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "dtprobed",
            "--prune-interval",
            "0",
            "--device",
            str(tmp_path / "h"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert bad.returncode == 1, bad.stderr  # a usage error is fatal, never a restart loop
    assert "--prune-interval" in bad.stderr


# ------------------------------------------- the decision itself, on a hand-made stash tree


class _Sleeper:
    """A real process (``sleep``) and a stash tree naming it, as the writer would."""

    def __init__(self, tmp: Path) -> None:
        self.proc = subprocess.Popen(["sleep", "600"])
        self.pid = self.proc.pid
        exe = next(
            m
            for m in AddressSpace.from_maps(
                _wait_maps(self.pid, os.path.realpath("/usr/bin/sleep"))
            ).mappings
            if m.file_backed and m.path == os.path.realpath("/usr/bin/sleep")
        )
        self.exe_key = f"{exe.dev}-{exe.ino}"
        self.dofpid = tmp / "stash" / "dof-pid"
        self.dir = self.dofpid / str(self.pid)
        self.dir.mkdir(parents=True)
        st = stat_of(self.pid)
        assert st is not None
        os.setxattr(self.dir, XATTR_START_TIME, str(st.start_time).encode())
        token = current_exec_token(self.pid)
        assert token
        os.setxattr(self.dir, XATTR_EXEC_TOKEN, token.encode())
        for gen, key in ((0, self.exe_key), (1, "1-2"), (2, "1-2")):
            os.symlink(key, self.dir / str(gen))
            (self.dir / key).mkdir(exist_ok=True)

    def find(self) -> list[tuple[str, tuple[int, ...]]] | None:
        fd = os.open(self.dofpid, os.O_RDONLY | os.O_DIRECTORY)
        try:
            result = find_unmapped(fd, self.pid)
            if result is None:
                return None
            found, still_valid = result
            assert still_valid()  # nothing changed since: the removals may go ahead
            return [(u.key, u.gens) for u in found]
        finally:
            os.close(fd)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _wait_maps(pid: int, path: str) -> bytes:
    """/proc/PID/maps once *path* is mapped (the exec has happened)."""
    deadline = time.monotonic() + 30
    while True:
        text = Path(f"/proc/{pid}/maps").read_bytes()
        if path.encode() in text or time.monotonic() > deadline:
            return text
        time.sleep(0.01)


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[_Sleeper]:
    s = _Sleeper(tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_decision_drops_only_what_is_unmapped(sleeper: _Sleeper) -> None:
    # the executable is mapped: kept; "1-2" (two generations) is not: both found
    assert sleeper.find() == [("1-2", (1, 2))]


def test_decision_skips_another_process_of_that_pid(sleeper: _Sleeper) -> None:
    os.setxattr(sleeper.dir, XATTR_START_TIME, b"1")  # an earlier process (pid reuse)
    assert sleeper.find() is None


def test_decision_skips_an_exec_d_image(sleeper: _Sleeper) -> None:
    os.setxattr(sleeper.dir, XATTR_EXEC_TOKEN, b"at_random:1")  # another image's token
    assert sleeper.find() is None


def test_decision_skips_upstream_s_directories(sleeper: _Sleeper) -> None:
    os.removexattr(sleeper.dir, XATTR_START_TIME)  # written by upstream's daemon
    assert sleeper.find() is None


def test_decision_skips_a_dead_process(sleeper: _Sleeper) -> None:
    sleeper.close()
    assert sleeper.find() is None


def test_recheck_fails_when_a_generation_changed(sleeper: _Sleeper) -> None:
    fd = os.open(sleeper.dofpid, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = find_unmapped(fd, sleeper.pid)
        assert result is not None
        found, still_valid = result
        assert [u.key for u in found] == ["1-2"]
        # generation 2 now names another mapping (e.g. an exec and new registrations)
        (sleeper.dir / "2").unlink()
        os.symlink(sleeper.exe_key, sleeper.dir / "2")
        assert not still_valid()
    finally:
        os.close(fd)
