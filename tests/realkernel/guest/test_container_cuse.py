"""Programs in containers against a CUSE daemon, on the VM's Debian 6.1 kernel (guest only).

The same containers as tests/integration/test_container.py (pid and mount namespaces, an
overlayfs root, optionally a user namespace whose root is host uid 100000), with the
helper a real CUSE character device: the host's ``/dev/dtrace`` directory (devtmpfs) is
bind-mounted at the container's ``/dev/dtrace``, as a runtime passes a device directory
in. What CUSE adds to the FUSE-mode tests on the host:

* ``DTRACEHIOC_REMOVE`` reaches the daemon from inside the container: a dlclosed
  library's generation goes at once (``removed generation 1``), not at the next prune —
  for a ``.SUNW_dof`` program (ADDDOF) and for one built by the real dtrace 2.0.7
  (HASUSDT, its object read through ``/proc/HOSTPID/map_files``);
* a container started *before* the daemon: the CUSE node appears in devtmpfs when the
  daemon starts, so it shows up in the container's bind of ``/dev/dtrace`` by itself;
  catch-up finds it through ``/proc/HOSTPID/root`` (same character device) and registers
  the program under its host pid, at generation 1.

Also here, not in a container: the unmapped-objects prune in CUSE mode (a registration
whose code its process unmapped without a REMOVE goes at the next prune).

The image layer (the ``.SUNW_dof`` objects) sits over the sid tree. Only pid and mount
namespaces here: the guest runs its command chrooted (tools/cuse-vm's ``/init`` chroots
into the overlay root), and the kernel refuses a new user namespace to a chrooted caller
(``unshare --user true`` in the guest: "Operation not permitted", with
``max_user_namespaces`` 3797 on its 6.1 kernel). A ``pivot_root`` into a bind of that
root, in a mount namespace of its own, does not help (tried): the kernel's test is
whether the root is what the namespace's first mount (the initramfs) leads to, and the
guest's root is an overlay mounted inside it. The user-namespace variant runs on the
host, in FUSE mode (tests/integration/test_container.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_container import (
    ENV,
    LIB,
    MAIN,
    SUNW_DIR,
    Container,
    maps_base,
    maps_key,
)
from tests.integration.test_unmapped import AnonClient, anon_key
from tests.realdtrace import partner
from tests.support import sunw_dof as sd
from tests.support.daemon import DaemonHandle, finish, start_daemon
from tests.support.stash_view import generations, probe_files

pytestmark = pytest.mark.timeout(900)

VARIANTS = ["pid+mount"]
_counter = 0


@pytest.fixture(scope="module")
def root() -> Path:
    return partner.ensure_chroot()


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Path, dict[str, sd.BuiltObject]]]:
    objs = {
        "pie": sd.build_sunw_object(MAIN, kind="pie", name="ctrpie"),
        "lib": sd.build_sunw_object(LIB, kind="lib", name="libctr.so"),
    }
    with tempfile.TemporaryDirectory(prefix="ctr-image.", dir="/dev/shm") as tmp:
        layer = Path(tmp)
        layer.chmod(0o755)
        (layer / SUNW_DIR.lstrip("/")).mkdir(parents=True)
        for obj in objs.values():
            shutil.copy2(obj.path, layer / SUNW_DIR.lstrip("/") / obj.name)
        yield layer, objs


@pytest.fixture
def shm() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ctr.", dir="/dev/shm") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


def cuse_device() -> Path:
    """A private CUSE node in the host's /dev/dtrace (the directory the container gets)."""
    global _counter
    _counter += 1
    Path("/dev/dtrace").mkdir(exist_ok=True)
    return Path(f"/dev/dtrace/ctr-{os.getpid()}-{_counter}")


def start_cuse(shm: Path, device: Path) -> DaemonHandle:
    # -t 60: under emulation on a loaded host a child's first answer can take seconds
    handle = start_daemon(shm, device=device, extra_args=["--device-mode", "cuse", "-t", "60"])
    try:  # the "ready" line is written just after the ready byte
        handle.wait_for("the ready line", lambda: "(cuse mode)" in handle.log_text())
    except BaseException:
        handle.cleanup_hard()
        raise
    return handle


@pytest.mark.parametrize("variant", VARIANTS)
def test_container_program_registers_and_removes_over_cuse(
    shm: Path, root: Path, image: tuple[Path, dict[str, sd.BuiltObject]], variant: str
) -> None:
    userns = variant.startswith("user")
    layer, objs = image
    pie, lib = objs["pie"], objs["lib"]
    device = cuse_device()
    daemon = start_cuse(shm, device)
    try:
        ctr = Container(
            shm / "ctr",
            [layer, root],
            Path("/dev/dtrace"),
            [f"{SUNW_DIR}/{pie.name}"],
            userns=userns,
            env={**ENV, "DTRACE_DOF_INIT_DEVNAME": str(device)},
        )
        prog = sd.SunwProgram(ctr.proc)
        prog.pid = 1
        host = ctr.pid
        try:
            ctr.ready(prog.read_line)
            assert ctr.nspid() == [host, 1]
            assert prog.info()["gen"] == "0"
            key = maps_key(host, pie.name)
            assert generations(daemon.state_dir, host) == {0: key}
            mapping = daemon.state_dir / "stash" / "dof-pid" / str(host) / key
            assert (mapping / "dh").read_bytes() == pie.helper(maps_base(host, pie.name))
            assert set(probe_files(daemon.state_dir, host)) == {"ctrmain:ctrpie:ctrmain_tick:tick"}
            assert prog.command(f"o {SUNW_DIR}/{lib.name}") == f"o {SUNW_DIR}/{lib.name}"
            assert prog.info("li")["gen"] == "1"
            assert sorted(generations(daemon.state_dir, host)) == [0, 1]
            daemon.verify()
            assert prog.command("c") == "c"
            # CUSE: the destructor's REMOVE arrives from inside the container (dlclose
            # returns once it is answered; the INFO line follows the answer)
            assert sorted(generations(daemon.state_dir, host)) == [0]
            daemon.wait_for(
                "the REMOVE's log line",
                lambda: f"{host}: removed generation 1" in daemon.log_text(),
                timeout=300,
            )
            daemon.verify()
        finally:
            status, err = prog.quit()
        assert status == 0, err
        assert "ioctl failed to remove" not in err, err
        daemon.wait_for("the exit's REMOVE", lambda: host not in daemon.stash_pids(), 300)
        daemon.verify()
    except BaseException:
        daemon.cleanup_hard()
        raise
    finish(daemon)


@pytest.mark.parametrize("variant", VARIANTS)
def test_container_started_before_the_cuse_daemon_is_caught_up(
    shm: Path, root: Path, image: tuple[Path, dict[str, sd.BuiltObject]], variant: str
) -> None:
    userns = variant.startswith("user")
    layer, objs = image
    pie = objs["pie"]
    device = cuse_device()
    ctr = Container(
        shm / "ctr",
        [layer, root],
        Path("/dev/dtrace"),
        [f"{SUNW_DIR}/{pie.name}"],
        userns=userns,
        env={**ENV, "DTRACE_DOF_INIT_DEVNAME": str(device)},
    )
    prog = sd.SunwProgram(ctr.proc)
    prog.pid = 1
    host = ctr.pid
    daemon: DaemonHandle | None = None
    try:
        ctr.ready(prog.read_line)
        info = prog.info()
        assert (info["gen"], info["errno"]) == ("0", "2"), info  # ENOENT: no node yet
        daemon = start_cuse(shm, device)
        daemon.wait_for(
            "the start-up catch-up",
            lambda: f"catch-up: {host}: registered" in daemon.log_text(),
            timeout=300,
        )
        key = maps_key(host, pie.name)
        assert generations(daemon.state_dir, host) == {1: key}
        mapping = daemon.state_dir / "stash" / "dof-pid" / str(host) / key
        assert (mapping / "dh").read_bytes() == pie.helper(maps_base(host, pie.name))
        assert set(probe_files(daemon.state_dir, host)) == {"ctrmain:ctrpie:ctrmain_tick:tick"}
        daemon.verify()
    except BaseException:
        if daemon is not None:
            daemon.cleanup_hard()
        raise
    finally:
        status, err = prog.quit()
    assert status == 0, err
    assert daemon is not None
    # its destructor's REMOVE(0) is ambiguous (a caught-up process): only what is no longer
    # mapped goes; the exit itself prunes the rest
    daemon.wait_for("exit pruning", lambda: host not in daemon.stash_pids(), 300)
    daemon.verify()
    finish(daemon)


@pytest.fixture(scope="module")
def progs(root: Path) -> partner.Programs:
    return partner.build_programs(root)  # built on the host before the boot: cached


def test_notes_program_in_a_container_over_cuse(
    shm: Path, root: Path, progs: partner.Programs
) -> None:
    """A dtrace 2.0.7 program (HASUSDT) in a container: registered under its host pid, its
    library's REMOVE at dlclose and its exit's REMOVE arrive from inside the container."""
    device = cuse_device()
    daemon = start_cuse(shm, device)
    try:
        ctr = Container(
            shm / "ctr",
            [root],
            Path("/dev/dtrace"),
            [progs.in_chroot(progs.usdtprog)],
            userns=False,
            env={**ENV, **partner.CLEAN_ENV, "DTRACE_DOF_INIT_DEVNAME": str(device)},
            text=True,
        )
        prog = partner.Program(ctr.proc, 1)
        host = ctr.pid
        try:
            ctr.ready(prog.read_line)
            assert ctr.nspid() == [host, 1]
            daemon.wait_for("registration", lambda: len(generations(daemon.state_dir, host)) == 1)
            assert generations(daemon.state_dir, host) == {0: maps_key(host, "usdtprog")}
            assert {n.split(":")[0] for n in probe_files(daemon.state_dir, host)} == {"rdtmain"}
            assert prog.command("o").startswith("o /")
            daemon.wait_for("the library", lambda: len(generations(daemon.state_dir, host)) == 2)
            assert generations(daemon.state_dir, host)[1] == maps_key(host, "libusdtlib.so")
            daemon.verify()
            assert prog.command("c") == "c"
            daemon.wait_for(
                "the library's REMOVE",
                lambda: f"{host}: removed generation 1" in daemon.log_text(),
                timeout=300,
            )
            assert sorted(generations(daemon.state_dir, host)) == [0]
            daemon.verify()
        finally:
            status, err = prog.quit()
        assert status == 0, err
        daemon.wait_for(
            "the exit's REMOVE",
            lambda: (
                f"{host}: removed generation 0" in daemon.log_text()
                and host not in daemon.stash_pids()
            ),
            300,
        )
        daemon.verify()
    except BaseException:
        daemon.cleanup_hard()
        raise
    finish(daemon)


def test_unmapped_without_remove_goes_at_the_prune_over_cuse(shm: Path) -> None:
    """The unmapped-objects prune runs in CUSE mode too: a libusdt-style process (anonymous
    DOF, code from an unlinked file) that unmaps one provider's code without sending REMOVE
    loses that registration at the next prune, and keeps the other (not in a container:
    the part of the prune that CUSE's REMOVE does not cover)."""
    device = cuse_device()
    handle = start_daemon(
        shm,
        device=device,
        extra_args=["--device-mode", "cuse", "-t", "60", "--prune-interval", "0.5"],
    )
    try:
        client = AnonClient(device, shm)
        pid = client.pid
        try:
            assert generations(handle.state_dir, pid) == {0: anon_key(0), 1: anon_key(1)}
            client.unmap("code", 0)
            dropped = f"{pid}: anonfirst ({anon_key(0)}) is no longer mapped: dropped generation 0"
            handle.wait_for("the drop", lambda: dropped in handle.log_text(), timeout=300)
            assert generations(handle.state_dir, pid) == {1: anon_key(1)}
            assert "removed generation" not in handle.log_text()  # no REMOVE was sent
            handle.verify()
        finally:
            assert client.close() == 0
        handle.wait_for("exit pruning", lambda: pid not in handle.stash_pids(), 300)
        handle.verify()
    except BaseException:
        handle.cleanup_hard()
        raise
    finish(handle)
