"""Catch-up with the real dtrace 2.0.7: caught-up programs are listed and their probes fire.

With no daemon, a ``.note.usdt`` program built by the chroot's ``dtrace -G`` (with its
notes library dlopened) runs in the sid chroot, and a ``.SUNW_dof`` program
(:mod:`tests.support.sunw_dof`) on the host; both constructors fail to open the helper.
Then a private FUSE-mode daemon starts. The host program is caught up at start-up. The
chroot sees the helper only once it is bind-mounted there (the host's ``/`` is a private
mount here: a mount made later on the host does not reach into the chroot's bind of the
directory), so until then the chroot program names a helper that is not ours and is
skipped; ``dtprobed-stash catch-up`` after the bind registers it. Each caught-up
registration is compared with a live registration of the same program against the same
daemon (same raw blocks, ``dh`` and parsed files, up to the load base), and the real
``dtrace`` lists and fires the caught-up probes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dtprobed.daemon.identity import parse_maps
from tests.integration.test_sunw_dof import MAIN, Running, check_stash
from tests.realdtrace import partner
from tests.support import sunw_dof as sd
from tests.support.daemon import DaemonHandle, finish, start_daemon
from tests.support.stash_view import file_key, generations, probe_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ONE_CPU = {min(os.sched_getaffinity(0))}
FIRE_WINDOW = 240.0


@pytest.fixture(scope="module")
def root() -> Path:
    try:
        return partner.ensure_chroot()
    except partner.PartnerError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="module")
def progs(root: Path) -> partner.Programs:
    return partner.build_programs(root)


@pytest.fixture(scope="module")
def pie() -> sd.BuiltObject:
    try:
        return sd.build_sunw_object(MAIN, kind="pie", name="sunwpie")
    except sd.BuildError as err:
        pytest.fail(str(err), pytrace=False)


def summaries(daemon: DaemonHandle) -> list[str]:
    return [ln for ln in daemon.log_text().splitlines() if "catch-up: " in ln and "scanned" in ln]


def first_start(pid: int, key: str) -> int:
    """Start of the lowest mapping of file *key* (``$dev-$ino``) in *pid*: its load base."""
    with open(f"/proc/{pid}/maps", "rb") as f:
        maps = parse_maps(f.read())
    return min(m.start for m in maps if f"{m.dev}-{m.ino}" == key)


def relative(daemon: DaemonHandle, pid: int, key: str) -> dict[str, set[tuple[int, bool]]]:
    """The parsed files of *key* in *pid*: probe → tracepoints relative to the load base."""
    base = first_start(pid, key)
    dh = (daemon.state_dir / "stash" / "dof-pid" / str(pid) / key / "dh").read_bytes()
    assert int.from_bytes(dh[64:72], "little") == base  # dofhp_addr: the load base (ET_DYN)
    assert dh[72:80] == bytes(8)  # dofhp_dof: 0 for notes, as upstream's drti sends
    out: dict[str, set[tuple[int, bool]]] = {}
    mod = dh[:64].rstrip(b"\0").decode()
    for name, pf in probe_files(daemon.state_dir, pid).items():
        if f":{mod}:" in name:
            out[name] = {(tp.addr - base, tp.is_enabled) for tp in pf.tracepoints}
    return out


@pytest.fixture
def tmp_shm() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="catchup.", dir="/dev/shm") as tmp:
        yield Path(tmp)


def test_caught_up_notes_and_dof_programs_fire(
    root: Path, progs: partner.Programs, pie: sd.BuiltObject, tmp_shm: Path
) -> None:
    helper = tmp_shm / "helper"
    with partner.mounted(root=root, binds=[tmp_shm, sd.cache_dir()]):
        notes = partner.Program.start(progs.usdtprog, devname=helper, root=root)
        started: list[partner.Program] = [notes]
        sunw = sd.SunwProgram.start(pie.path, devname=helper, cpus=ONE_CPU)
        try:
            assert notes.command("o").startswith("o /")
            daemon = start_daemon(tmp_shm, device=helper)
            try:
                daemon.wait_for("the start-up catch-up", lambda: len(summaries(daemon)) >= 1, 120)
                check_stash(daemon, Running(sunw, pie), sunw.pid, 1)
                assert notes.pid not in daemon.stash_pids()  # its helper is not ours yet
                with partner.mounted(root=root, binds=[helper]):
                    result = daemon.stash_cli("catch-up")
                    assert result.returncode == 0, result.stdout + result.stderr
                    assert "2 objects registered" in result.stdout, result.stdout
                    main_key, lib_key = file_key(progs.usdtprog), file_key(progs.libusdtlib)
                    assert generations(daemon.state_dir, notes.pid) == {1: main_key, 2: lib_key}
                    # the same program registering live now: gens 0 and 1, the same files
                    live = partner.Program.start(progs.usdtprog, devname=helper, root=root)
                    started.append(live)
                    assert live.command("o").startswith("o /")
                    daemon.wait_for(
                        "the live registrations",
                        lambda: len(generations(daemon.state_dir, live.pid)) == 2,
                    )
                    assert generations(daemon.state_dir, live.pid) == {0: main_key, 1: lib_key}
                    for key in (main_key, lib_key):
                        a = daemon.state_dir / "stash" / "dof-pid" / str(notes.pid) / key
                        b = daemon.state_dir / "stash" / "dof-pid" / str(live.pid) / key
                        for raw in ("raw", "raw-1"):  # notes and .rodata, as read from the file
                            assert (a / raw).read_bytes() == (b / raw).read_bytes(), raw
                        assert (a / "dh").read_bytes()[:64] == (b / "dh").read_bytes()[:64]
                        caught = relative(daemon, notes.pid, key)
                        assert caught and caught == relative(daemon, live.pid, key), key
                    daemon.verify()
                    check_listed_and_fired(daemon, root, notes, sunw)
                    daemon.verify()
            except BaseException:
                daemon.cleanup_hard()
                raise
            for prog in started:
                status, err = prog.quit()
                assert status == 0, err
            pid = sunw.pid
            status, err = sunw.quit()
            assert status == 0, err
            gone = [p.pid for p in started] + [pid]
            daemon.wait_for(
                "exit pruning", lambda: not set(gone) & set(daemon.stash_pids()), timeout=120
            )
            daemon.verify()
            finish(daemon)
        finally:
            for prog in started:
                prog.kill()
            sunw.kill()


def check_listed_and_fired(
    daemon: DaemonHandle, root: Path, notes: partner.Program, sunw: sd.SunwProgram
) -> None:
    pid = notes.pid
    rows = partner.dtrace_list(daemon.state_dir, f"rdt*{pid}", root=root).rows
    assert {(r.provider, r.module, r.function, r.name) for r in rows} == {
        (f"rdtmain{pid}", "usdtprog", "fire_ticks", "tick"),
        (f"rdtmain{pid}", "usdtprog", "fire_ticks", "done-all"),
        (f"rdtmain{pid}", "usdtprog", "serve", "start"),
        (f"rdtmain{pid}", "usdtprog", "serve", "tick"),
        (f"rdtlib{pid}", "libusdtlib.so", "rdtlib_fire", "enter"),
        (f"rdtlib{pid}", "libusdtlib.so", "rdtlib_fire", "call"),
    }
    script = (
        'rdtlib$target:::call { printf("call %d\\n", args[0]); }'
        ' rdtmain$target::fire_ticks:tick { printf("tick %d\\n", args[0]); }'
        ' rdtmain$target:::done-all { printf("done %d\\n", args[0]); exit(0); }'
    )
    out = partner.dtrace_fire(
        daemon.state_dir,
        script,
        pid,
        trigger=lambda: (notes.command("l 2"), notes.command("f 3")),
        duration=FIRE_WINDOW,
        root=root,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln]
    assert lines == ["call 0", "call 1", "tick 0", "tick 1", "tick 2", "done 3"], out.stderr
    # the caught-up DOF program: its regular sites fire from the stash too
    script = (
        'sunwmain$target:::tick { printf("tick %d %u\\n", args[0], args[1]); }'
        ' sunwmain$target:::done-all { printf("done %d\\n", args[0]); exit(0); }'
    )
    out = partner.dtrace_fire(
        daemon.state_dir,
        script,
        sunw.pid,
        trigger=lambda: (sunw.command("f 0 2"), sunw.command("f 1 1")),
        duration=FIRE_WINDOW,
        root=root,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln]
    assert lines == ["tick 0 1", "tick 1000 1001", "done 0"], out.stderr
