"""The real dtrace 2.0.7 against our daemon in FUSE mode (host kernel, no CUSE).

One private daemon for the module (FUSE file on a tmpfs path, state directory beside it),
bind-mounted into the sid chroot (``partner.mounted``). Programs built there by the real
``dtrace -h``/``dtrace -G`` (``partner.build_programs``) register with it through drti
2.0.7 (``DTRACEHIOC_HASUSDT``), an ADDDOF client (``dofclient.py``) through
``DTRACEHIOC_ADDDOF``; the real ``dtrace -l`` lists them from our stash and ``dtrace -n
... -p PID`` fires them.

This host kernel is locked down (integrity): an enabling that includes an is-enabled
site cannot load its BPF program here, so every fire below names the function of the
regular sites (``fire_ticks``, ``serve:start``); is-enabled probes are listed here and fired
in the CUSE VM (tests/realkernel/guest/test_realdtrace.py).

In FUSE mode ``DTRACEHIOC_REMOVE`` cannot reach the daemon (the kernel fails it with
EFAULT: README, FUSE mode), so a dlclose()d library goes only at the next periodic prune,
which finds it unmapped (``--prune-interval``, :data:`PRUNE_INTERVAL` here);
``test_library_dlopen_dlclose`` asserts exactly that.

Each ``dtrace`` script ends with ``exit(0)`` at the last probe fired: dtrace then detaches
by itself (its uprobe teardown takes seconds to tens of seconds on a loaded machine);
killing it before it has detached can leave a breakpoint behind that kills the target
with SIGTRAP.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realdtrace import dofclient, partner
from tests.support.daemon import REPO, DaemonHandle, finish, start_daemon
from tests.support.stash_view import generations, probe_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: Bound on waiting for exit pruning (a loaded machine; never a timing assertion).
PRUNE_WAIT = 60.0
#: The module daemon's periodic prune, which drops what processes unmapped (FUSE mode).
PRUNE_INTERVAL = 2.0
#: dtrace waits this long at most for the script's own exit(0) (it normally comes first).
FIRE_WINDOW = 240.0


@pytest.fixture(scope="module")
def root() -> Path:
    return partner.ensure_chroot()


@pytest.fixture(scope="module")
def progs(root: Path) -> partner.Programs:
    return partner.build_programs(root)


@pytest.fixture(scope="module")
def daemon(root: Path) -> Iterator[DaemonHandle]:
    with tempfile.TemporaryDirectory(prefix="rdt-interop.", dir="/dev/shm") as tmp:
        handle = start_daemon(Path(tmp), extra_args=["--prune-interval", str(PRUNE_INTERVAL)])
        try:
            with partner.mounted(root=root, binds=[tmp, handle.device]):
                yield handle
        except BaseException:
            handle.cleanup_hard()
            raise
        finish(handle)


def rows(daemon: DaemonHandle, root: Path, pattern: str) -> set[tuple[str, str, str, str]]:
    listed = partner.dtrace_list(daemon.state_dir, pattern, root=root)
    return {(r.provider, r.module, r.function, r.name) for r in listed.rows}


def providers_of(daemon: DaemonHandle, root: Path, pid: int) -> set[str]:
    """Providers of ``pid`` that ``dtrace -l`` lists (a pattern naming a dead pid would make
    dtrace try to grab it and fail, so list everything and filter)."""
    return {prov for prov, *_ in rows(daemon, root, "rdt*") if re.fullmatch(f"[a-z]+{pid}", prov)}


def main_rows(pid: int) -> set[tuple[str, str, str, str]]:
    prov = f"rdtmain{pid}"
    return {
        (prov, "usdtprog", "fire_ticks", "tick"),
        (prov, "usdtprog", "fire_ticks", "done-all"),
        (prov, "usdtprog", "serve", "start"),
        (prov, "usdtprog", "serve", "tick"),  # the is-enabled site (RDTMAIN_TICK_ENABLED)
    }


#: Regular sites only (is-enabled ones cannot load here); prints every typed argument.
MAIN_SCRIPT = (
    'rdtmain$target::serve:start { printf("start %s %d\\n", copyinstr(arg0), args[1]); }'
    ' rdtmain$target::fire_ticks:tick { printf("tick %d %u\\n", args[0], args[1]); }'
    ' rdtmain$target::fire_ticks:done-all { printf("done %d\\n", args[0]); exit(0); }'
)


#: tick's uint64_t argument starts here in test_executable_listed_and_fired: above 2**63,
#: so a 32-bit or signed reading of it would print something else.
BIG = 0xFFFFFFFF00000000


def expected_main_output(pid: int, n: int, base: int = 0) -> str:
    ticks = "".join(f"tick {i} {base + i * 1000}\n" for i in range(n))
    return f"start usdtprog {pid}\n{ticks}done {n}\n"


def wait_registered(daemon: DaemonHandle, pid: int, gens: int = 1) -> None:
    daemon.wait_for(
        f"{gens} generation(s) of pid {pid}",
        lambda: len(generations(daemon.state_dir, pid)) >= gens,
        timeout=30,
    )


def start_prog(progs: partner.Programs, daemon: DaemonHandle, root: Path) -> partner.Program:
    prog = partner.Program.start(progs.usdtprog, devname=daemon.device, root=root)
    wait_registered(daemon, prog.pid)
    return prog


def test_executable_listed_and_fired(
    daemon: DaemonHandle, root: Path, progs: partner.Programs
) -> None:
    prog = start_prog(progs, daemon, root)
    try:
        assert list(generations(daemon.state_dir, prog.pid)) == [0]
        assert rows(daemon, root, f"rdtmain{prog.pid}") == main_rows(prog.pid)
        # the is-enabled site is stashed as one (serve:tick), the regular ones are not
        stashed = probe_files(daemon.state_dir, prog.pid)
        assert [t.is_enabled for t in stashed["rdtmain:usdtprog:serve:tick"].tracepoints] == [True]
        assert [t.is_enabled for t in stashed["rdtmain:usdtprog:fire_ticks:tick"].tracepoints] == [
            False
        ]

        def trigger() -> None:
            assert prog.command("s") == "s"
            assert prog.command(f"f 5 {BIG}") == "f 5"

        out = partner.dtrace_fire(
            daemon.state_dir,
            MAIN_SCRIPT,
            prog.pid,
            trigger=trigger,
            duration=FIRE_WINDOW,
            root=root,
        )
        assert out.stdout.strip("\n") + "\n" == expected_main_output(prog.pid, 5, BIG), out.stderr
        assert out.returncode == 0, out.stderr
    finally:
        status, err = prog.quit()
    assert status == 0, err
    # drti's destructor REMOVE cannot reach a FUSE helper (EFAULT in the kernel):
    assert "DRTI: Ioctl failed to remove DOF" in err
    daemon.wait_for(
        "exit pruning",
        lambda: prog.pid not in daemon.stash_pids() + daemon.probe_pids(),
        timeout=PRUNE_WAIT,
    )
    assert providers_of(daemon, root, prog.pid) == set()


def test_library_dlopen_dlclose(daemon: DaemonHandle, root: Path, progs: partner.Programs) -> None:
    prog = start_prog(progs, daemon, root)
    lib = f"rdtlib{prog.pid}"
    lib_rows = {
        (lib, "libusdtlib.so", "rdtlib_fire", "enter"),
        (lib, "libusdtlib.so", "rdtlib_fire", "call"),
    }
    try:
        assert prog.command("o").startswith("o /")
        wait_registered(daemon, prog.pid, gens=2)
        assert sorted(generations(daemon.state_dir, prog.pid)) == [0, 1]
        assert rows(daemon, root, f"rdt*{prog.pid}") == main_rows(prog.pid) | lib_rows

        out = partner.dtrace_fire(
            daemon.state_dir,
            'rdtlib$target:::enter { printf("enter\\n"); }'
            ' rdtlib$target:::call { printf("call %d %s\\n", args[0], copyinstr(arg1));'
            " @n = count(); }"
            " rdtlib$target:::call /args[0] == 2/ { exit(0); }"
            ' END { printa("calls %@d\\n", @n); }',
            prog.pid,
            trigger=lambda: prog.command("l 3"),
            duration=FIRE_WINDOW,
            root=root,
        )
        assert [ln for ln in out.stdout.splitlines() if ln] == [
            "enter",
            "call 0 usdtlib",
            "call 1 usdtlib",
            "call 2 usdtlib",
            "calls 3",
        ], out.stderr

        assert prog.command("c") == "c"
        # FUSE mode: drti's REMOVE at dlclose fails in the kernel (EFAULT) before the daemon
        # sees it; the next periodic prune finds the library unmapped and drops gen 1 and
        # its probe files, and only those (documented: README, FUSE mode).
        # (the log line comes once the whole removal is done)
        daemon.wait_for(
            "the unmapped library dropped",
            lambda: (
                re.search(
                    rf"{prog.pid}: \S+ \(\S+\) is no longer mapped: dropped generation 1$",
                    daemon.log_text(),
                    re.MULTILINE,
                )
                is not None
            ),
            timeout=PRUNE_WAIT,
        )
        assert sorted(generations(daemon.state_dir, prog.pid)) == [0]
        assert not (daemon.state_dir / "probes" / str(prog.pid) / lib).exists()
        assert rows(daemon, root, f"rdt*{prog.pid}") == main_rows(prog.pid)
        daemon.verify()
    finally:
        status, err = prog.quit()
    assert status == 0, err
    # once at dlclose (gen 1), once at exit (gen 0)
    assert err.count("DRTI: Ioctl failed to remove DOF") == 2, err
    daemon.wait_for(
        "exit pruning",
        lambda: prog.pid not in daemon.stash_pids() + daemon.probe_pids(),
        timeout=PRUNE_WAIT,
    )
    assert providers_of(daemon, root, prog.pid) == set()


def test_fork_child_registers_and_fires(
    daemon: DaemonHandle, root: Path, progs: partner.Programs
) -> None:
    prog = start_prog(progs, daemon, root)
    try:
        child = int(prog.command("k").split()[1])
        assert prog.expect(f"{child} ") == f"{child} ready"
        wait_registered(daemon, child)
        # its own pid, its own generation 0, the same object as the parent's
        assert generations(daemon.state_dir, child) == generations(daemon.state_dir, prog.pid)
        assert rows(daemon, root, f"rdtmain{child}") == main_rows(child)

        def trigger() -> None:
            assert prog.command("> s") == ">"
            assert prog.expect(f"{child} ") == f"{child} ok s"
            assert prog.command("> f 2") == ">"
            assert prog.expect(f"{child} ") == f"{child} ok f 2"

        out = partner.dtrace_fire(
            daemon.state_dir, MAIN_SCRIPT, child, trigger=trigger, duration=FIRE_WINDOW, root=root
        )
        assert out.stdout.strip("\n") + "\n" == expected_main_output(child, 2), out.stderr
        assert prog.command("w") == "w 0"
        daemon.wait_for(
            "the child's pruning", lambda: child not in daemon.stash_pids(), timeout=PRUNE_WAIT
        )
        assert prog.pid in daemon.stash_pids()  # the parent's registration stays
    finally:
        status, err = prog.quit()
    assert status == 0, err


@pytest.mark.parametrize("anon", [False, True], ids=["file-dof", "anonymous-dof"])
def test_adddof_client_listed_and_fired(daemon: DaemonHandle, root: Path, anon: bool) -> None:
    """ADDDOF (DOF in a file mapping with dofhp_addr 0, as drti <= 2.0.2; or copied into
    anonymous memory with dofhp_addr = the DOF's address, as libusdt)."""
    work = daemon.state_dir.parent  # bound into the chroot: dtrace opens the code file there
    code = work / "dofclient.code"
    code.write_bytes(dofclient.code_bytes())
    dof = work / f"dofclient-{'anon' if anon else 'file'}.dof"
    dof.write_bytes(dofclient.object_file(relocate=not anon))
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.realdtrace.dofclient", "--device", str(daemon.device)),
            *("--code-file", str(code), "--dof-file", str(dof), *(["--anon"] if anon else [])),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        # one CPU: dtrace prints its per-CPU buffers one after another (see partner)
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
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
            proc.stdin.write("fire 3\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            assert json.loads(proc.stdout.readline()) == {"fired": 3}  # type: ignore[union-attr]

        out = partner.dtrace_fire(
            daemon.state_dir,
            f'{dofclient.PROVIDER}$target:::start {{ printf("start %d %s\\n", args[0],'
            " copyinstr(arg1)); }"
            f' {dofclient.PROVIDER}$target:::done {{ printf("done %d\\n", args[0]); exit(0); }}',
            pid,
            trigger=trigger,
            duration=FIRE_WINDOW,
            root=root,
        )
        assert [ln for ln in out.stdout.splitlines() if ln] == [
            "start 0 dofclient",
            "start 1 dofclient",
            "start 2 dofclient",
            "done 3",
        ], out.stderr
    finally:
        proc.stdin.write("exit\n")
        proc.stdin.close()
        assert proc.wait(60) == 0
    daemon.wait_for("exit pruning", lambda: pid not in daemon.stash_pids(), timeout=PRUNE_WAIT)
    os.unlink(dof)
