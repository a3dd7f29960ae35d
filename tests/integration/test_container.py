"""Programs in containers: their own pid and mount namespace, an overlayfs root, the helper
bind-mounted in, registering with a private FUSE-mode daemon on the host.

The container is made as runtimes make one, with ``unshare`` (util-linux) and a shell:
new pid and mount namespaces (and, in the user-namespace variant, a new user namespace
whose root is host uid 100000, as with subordinate ids — the test writes the uid and gid
maps itself, as ``newuidmap`` would); an overlayfs root of two read-only image layers
(a layer holding the ``.SUNW_dof`` test objects, over the Debian sid tree that
``tests/realdtrace`` prepared, which has the real dtrace 2.0.7's programs) and a
writable upper layer; a new ``/proc``; a tmpfs on ``/dev``; the host's helper
bind-mounted at the default ``/dev/dtrace/helper`` (no ``DTRACE_DOF_INIT_DEVNAME``);
then ``chroot`` and ``exec``: the program is the container's pid 1.

What it shows:

* the kernel's FUSE header carries the caller's pid in the *daemon's* pid namespace, so
  the program registers under its host pid (its ``NSpid`` is ``HOST 1``);
* its objects are identified by the (dev, ino) of their mappings in ``/proc/HOSTPID/maps``
  (overlayfs: never ``stat`` of a path, which names another file or none from the host);
  the notes object is read through ``/proc/HOSTPID/map_files``;
* the stash entry is what a host program gets (module = basename, ``dh``, probes with the
  container's run-time addresses), ``dtprobed-stash verify`` passes, a dlclosed library
  goes at the next prune, and the exit prunes it;
* the real dtrace 2.0.7, on the host, lists the container program's probes and fires them;
* a container started while nothing served the helper (its constructor's ioctl failed) is
  caught up when the daemon starts: the helper's directory is bind-mounted at
  ``/dev/dtrace`` from a shared mount, so the daemon's FUSE mount made later reaches the
  container (a runtime can do the same: an ``rslave`` bind of ``/dev/dtrace``), and catch-up
  finds, through ``/proc/HOSTPID/root``, that its ``/dev/dtrace/helper`` is ours.

The user-namespace variant runs where the kernel allows it (``/proc/sys/user/
max_user_namespaces`` > 0; this machine allows it as root); it is skipped with the reason
otherwise — the pid + mount variant always runs.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dtprobed.daemon.identity import AddressSpace
from tests.realdtrace import partner
from tests.support import sunw_dof as sd
from tests.support.daemon import DaemonHandle, children_of, finish, start_daemon
from tests.support.stash_view import generations, probe_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: Host uid (and gid) of the container's root in the user-namespace variant.
SUBID = 100000
SUBID_COUNT = 65536
#: Where the .SUNW_dof objects are in the container's image layer.
SUNW_DIR = "/opt/sunw"
MAIN = (sd.SunwProvider("ctrmain", (sd.SunwProbe("tick", ("int",)),)),)
LIB = (sd.SunwProvider("ctrlib", (sd.SunwProbe("call", ("int", "const char *")),)),)

#: Runs in the new pid and mount namespaces as the container's pid 1 (``$1`` … ``$6``:
#: lower layers, upper, work, merged, helper, more overlay options; then the command).
#: In a user namespace overlayfs can't set its ``trusted.*`` xattrs: ``userxattr``.  A
#: directory as the helper is bind-mounted at ``/dev/dtrace`` (a mount the daemon makes in
#: it later reaches the container: the mounts are slaves of the host's).
SETUP = r"""
set -eu
lower=$1 upper=$2 work=$3 merged=$4 helper=$5 ovlopts=$6
shift 6
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work$ovlopts" "$merged"
mount -t proc proc "$merged/proc"
mount -t tmpfs -o mode=755 tmpfs "$merged/dev"
mkdir -p "$merged/dev/dtrace"
if [ -d "$helper" ]; then
    mount --bind "$helper" "$merged/dev/dtrace"
else
    : > "$merged/dev/dtrace/helper"
    mount --bind "$helper" "$merged/dev/dtrace/helper"
fi
exec chroot "$merged" "$@"
"""

#: The user-namespace variant's first step (host root): a mount namespace of its own
#: where each image layer is bind-mounted, without its submounts, at its staging path
#: (argv[3]: "SRC:DST,..."); then a new user namespace; then wait (fd argv[2]) for the
#: parent to write its uid and gid maps (fd argv[1] says when), become its root — host
#: uid 100000 — while the capabilities of its creator are still held (an exec before the
#: maps exist would drop them), and exec the rest (``unshare`` …).  The staging is what
#: an unpacked image is anyway, a plain directory: overlayfs refuses, in a user
#: namespace, a lower layer with mounts beneath it (they are locked there: "failed to
#: clone lowerpath"), and the sid tree has them while the real dtrace uses it.
USERNS = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
MS_BIND, MS_REC, MS_SLAVE = 0x1000, 0x4000, 0x80000
def check(ok, what):
    if not ok:
        raise OSError(ctypes.get_errno(), what)
check(libc.unshare(0x20000) == 0, "unshare(CLONE_NEWNS)")
check(libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None) == 0, "mount --make-rslave /")
for pair in sys.argv[3].split(","):
    src, dst = pair.split(":")
    check(libc.mount(src.encode(), dst.encode(), None, MS_BIND, None) == 0, f"bind {src}")
check(libc.unshare(0x10000000) == 0, "unshare(CLONE_NEWUSER)")
ask, go = int(sys.argv[1]), int(sys.argv[2])
os.write(ask, b"u")
if os.read(go, 1) != b"g":
    sys.exit("no go from the parent")
os.close(ask)
os.close(go)
os.setgroups([])
os.setresgid(0, 0, 0)
os.setresuid(0, 0, 0)
os.execvp(sys.argv[4], sys.argv[4:])
"""


def userns_allowed() -> str | None:
    """None when this kernel lets us make a user namespace, else why not."""
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except OSError as err:
        return f"no /proc/sys/user/max_user_namespaces: {err}"
    if limit <= 0:
        return "user namespaces disabled (max_user_namespaces = 0)"
    probe = subprocess.run(["unshare", "--user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --user fails here: {probe.stderr.strip()}"
    return None


class Container:
    """One containerised program: ``proc`` is the host's ``unshare``; ``pid`` the program's
    host pid (the container's pid 1)."""

    def __init__(
        self,
        tmp: Path,
        layers: list[Path],
        helper: Path,
        argv: list[str],
        *,
        userns: bool,
        env: dict[str, str],
        text: bool = False,
    ) -> None:
        tmp.mkdir()
        upper, work, merged = tmp / "upper", tmp / "work", tmp / "merged"
        for d in (upper, work, merged):
            d.mkdir()
            if userns:
                os.chown(d, SUBID, SUBID)
        if userns:
            staged = [tmp / f"layer{i}" for i in range(len(layers))]
            for d in staged:
                d.mkdir()
            binds = ",".join(f"{src}:{dst}" for src, dst in zip(layers, staged, strict=True))
            layers = staged
        unshare = ["unshare", "--pid", "--mount", "--fork", "--propagation", "slave"]
        argv = [
            *unshare,
            "sh",
            "-c",
            SETUP,
            "setup",
            ":".join(str(layer) for layer in layers),
            str(upper),
            str(work),
            str(merged),
            str(helper),
            ",userxattr" if userns else "",
            *argv,
        ]
        ask_r = ask_w = go_r = go_w = -1
        if userns:
            ask_r, ask_w = os.pipe()
            go_r, go_w = os.pipe()
            argv = [sys.executable, "-c", USERNS, str(ask_w), str(go_r), binds, *argv]
        self.text = text
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                text=text,
                pass_fds=(ask_w, go_r) if userns else (),
            )
        finally:
            for fd in (ask_w, go_r):
                if fd >= 0:
                    os.close(fd)
        try:
            if userns:
                self._write_maps(ask_r, go_w)
            self.pid = self._child_pid()
        except BaseException:
            self.kill()
            raise
        finally:
            for fd in (ask_r, go_w):
                if fd >= 0:
                    os.close(fd)

    def _child_pid(self) -> int:
        deadline = time.monotonic() + 30
        while True:
            kids = children_of(self.proc.pid)
            if kids:
                return kids[0]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _, err = self.proc.communicate(timeout=30)
                raise AssertionError(f"the container did not start: {err!r}")
            time.sleep(0.01)

    def _write_maps(self, ask: int, go: int) -> None:
        """What newuidmap/newgidmap do: the container's 0..65535 are host 100000.. ."""
        ready, _, _ = select.select([ask], [], [], 30)
        if not ready or os.read(ask, 1) != b"u":
            raise AssertionError(f"the user-namespace launcher did not start: {self.stderr!r}")
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{self.proc.pid}/{name}").write_text(f"0 {SUBID} {SUBID_COUNT}\n")
        os.write(go, b"g")

    def ready(self, read_line: Callable[[], str]) -> None:
        """The program's first line must be "1 ready" (else: fail with the container's stderr)."""
        try:
            line = read_line()
        except Exception as err:
            self.kill()
            raise AssertionError(f"the container failed: {err}; stderr: {self.stderr!r}") from err
        assert line == "1 ready", line

    @property
    def stderr(self) -> str | bytes:
        with contextlib.suppress(Exception):
            err: str | bytes = self.proc.communicate(timeout=30)[1]
            return err
        return "?"

    def nspid(self) -> list[int]:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
        raise AssertionError("no NSpid line")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=30)


def fuse_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[4])
    raise AssertionError("no Uid line")


def maps_key(pid: int, name: str) -> str:
    """``$dev-$ino`` of the first mapping of the file called *name* in *pid* (from maps)."""
    space = AddressSpace.from_maps(Path(f"/proc/{pid}/maps").read_bytes())
    for m in space.mappings:
        if m.file_backed and os.path.basename(m.path) == name:
            return f"{m.dev}-{m.ino}"
    raise AssertionError(f"{name} is not mapped in {pid}")


def maps_base(pid: int, name: str) -> int:
    space = AddressSpace.from_maps(Path(f"/proc/{pid}/maps").read_bytes())
    return min(m.start for m in space.mappings if os.path.basename(m.path) == name)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root() -> Path:
    return partner.ensure_chroot()


@pytest.fixture(scope="module")
def progs(root: Path) -> partner.Programs:
    return partner.build_programs(root)


def _open_dir(parent: str) -> Iterator[Path]:
    """A temporary directory the container's root (host uid 100000) can traverse: pytest's
    are under a 0700 directory, so these go on /dev/shm (tmpfs), 0755."""
    with tempfile.TemporaryDirectory(prefix="ctr.", dir=parent) as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Path, dict[str, sd.BuiltObject]]]:
    """The image layer with the .SUNW_dof objects at /opt/sunw (over the sid tree)."""
    try:
        objs = {
            "pie": sd.build_sunw_object(MAIN, kind="pie", name="ctrpie"),
            "lib": sd.build_sunw_object(LIB, kind="lib", name="libctr.so"),
        }
    except sd.BuildError as err:
        pytest.fail(str(err), pytrace=False)
    for layer in _open_dir("/dev/shm"):
        (layer / SUNW_DIR.lstrip("/")).mkdir(parents=True)
        for obj in objs.values():
            shutil.copy2(obj.path, layer / SUNW_DIR.lstrip("/") / obj.name)
        yield layer, objs


@pytest.fixture
def shm() -> Iterator[Path]:
    yield from _open_dir("/dev/shm")


@pytest.fixture
def daemon(shm: Path, root: Path) -> Iterator[DaemonHandle]:
    handle = start_daemon(shm, extra_args=["--prune-interval", "0.2"])
    try:
        with partner.mounted(root=root, binds=[handle.state_dir]):
            yield handle
    except BaseException:
        handle.cleanup_hard()
        raise
    finish(handle)


VARIANTS = ["pid+mount", "user+pid+mount"]
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "DTRACE_DOF_INIT_DEBUG": "1"}


def _variant(variant: str) -> bool:
    userns = variant.startswith("user")
    if userns:
        why = userns_allowed()
        if why is not None:
            pytest.skip(f"user namespaces not allowed by this kernel: {why}")
    return userns


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", VARIANTS)
def test_dof_program_in_a_container(
    daemon: DaemonHandle,
    shm: Path,
    root: Path,
    image: tuple[Path, dict[str, sd.BuiltObject]],
    variant: str,
) -> None:
    userns = _variant(variant)
    layer, objs = image
    pie, lib = objs["pie"], objs["lib"]
    ctr = Container(
        shm / "ctr",
        [layer, root],
        daemon.device,
        [f"{SUNW_DIR}/{pie.name}"],
        userns=userns,
        env=ENV,
    )
    prog = sd.SunwProgram(ctr.proc)
    prog.pid = 1  # the driver names itself by its pid in the container
    host = ctr.pid
    try:
        ctr.ready(prog.read_line)
        assert ctr.nspid() == [host, 1]
        assert fuse_uid(host) == (SUBID if userns else 0)
        info = prog.info()
        assert (info["gen"], info["errno"]) == ("0", "0"), info
        key = maps_key(host, pie.name)
        assert generations(daemon.state_dir, host) == {0: key}
        mapping = daemon.state_dir / "stash" / "dof-pid" / str(host) / key
        base = maps_base(host, pie.name)
        assert (mapping / "dh").read_bytes() == pie.helper(base)
        stashed = probe_files(daemon.state_dir, host)
        assert set(stashed) == {"ctrmain:ctrpie:ctrmain_tick:tick"}
        assert [t.addr for t in stashed["ctrmain:ctrpie:ctrmain_tick:tick"].tracepoints] == [
            pie.relocated(s.addr, base) for s in pie.sites
        ]
        exec_mapping = (
            daemon.state_dir / "stash" / "dof-pid" / str(host) / "exec-mapping"
        ).read_text()
        assert exec_mapping == key  # the container's executable, as its host maps say
        daemon.verify()

        # a library, dlopened and dlclosed in the container: gone at the next prune
        assert prog.command(f"o {SUNW_DIR}/{lib.name}") == f"o {SUNW_DIR}/{lib.name}"
        assert prog.info("li")["gen"] == "1"
        lib_key = maps_key(host, lib.name)
        assert generations(daemon.state_dir, host)[1] == lib_key
        listed = partner.dtrace_list(daemon.state_dir, f"ctr*{host}", root=root)
        assert {(r.provider, r.module, r.function, r.name) for r in listed.rows} == {
            (f"ctrmain{host}", "ctrpie", "ctrmain_tick", "tick"),
            (f"ctrlib{host}", "libctr.so", "ctrlib_call", "call"),
        }, listed
        os.sched_setaffinity(host, {min(os.sched_getaffinity(0))})  # one buffer: in order
        out = partner.dtrace_fire(
            daemon.state_dir,
            'ctrlib$target:::call { printf("call %d %s\\n", args[0], copyinstr(arg1)); }'
            " ctrlib$target:::call /args[0] == 2000/ { exit(0); }",
            host,
            trigger=lambda: prog.command("l 0 3"),
            duration=240,
            root=root,
        )
        lines = [ln for ln in out.stdout.splitlines() if ln]
        expected = [f"call {lib.arg_values(0, i)[0]} {lib.arg_values(0, i)[1]}" for i in range(3)]
        assert lines == expected == ["call 0 call", "call 1000 call", "call 2000 call"], out
        assert prog.command("c") == "c"
        dropped = f"{host}: libctr.so ({lib_key}) is no longer mapped: dropped generation 1"
        daemon.wait_for("the dlclosed library's drop", lambda: dropped in daemon.log_text(), 120)
        assert sorted(generations(daemon.state_dir, host)) == [0]
        daemon.verify()
    finally:
        status, err = prog.quit()
    assert status == 0, err
    daemon.wait_for("exit pruning", lambda: host not in daemon.stash_pids(), timeout=120)
    daemon.verify()


@pytest.mark.parametrize("variant", VARIANTS)
def test_notes_program_in_a_container(
    daemon: DaemonHandle, shm: Path, root: Path, progs: partner.Programs, variant: str
) -> None:
    userns = _variant(variant)
    ctr = Container(
        shm / "ctr",
        [root],
        daemon.device,
        [progs.in_chroot(progs.usdtprog)],
        userns=userns,
        env={**ENV, **partner.CLEAN_ENV},
        text=True,
    )
    prog = partner.Program(ctr.proc, 1)
    host = ctr.pid
    try:
        ctr.ready(prog.read_line)
        assert ctr.nspid() == [host, 1]
        daemon.wait_for("registration", lambda: len(generations(daemon.state_dir, host)) == 1)
        key = maps_key(host, "usdtprog")
        assert generations(daemon.state_dir, host) == {0: key}
        mapping = daemon.state_dir / "stash" / "dof-pid" / str(host) / key
        assert (mapping / "dh").read_bytes()[:9] == b"usdtprog\0"
        assert {name.split(":")[0] for name in probe_files(daemon.state_dir, host)} == {"rdtmain"}
        daemon.verify()
        listed = partner.dtrace_list(daemon.state_dir, f"rdtmain{host}", root=root)
        assert {(r.module, r.function, r.name) for r in listed.rows} == {
            ("usdtprog", "fire_ticks", "tick"),
            ("usdtprog", "fire_ticks", "done-all"),
            ("usdtprog", "serve", "start"),
            ("usdtprog", "serve", "tick"),
        }, listed
        # and fires them: the uprobes go on the container's inode, the pid is the host's
        os.sched_setaffinity(host, {min(os.sched_getaffinity(0))})  # one buffer: in order
        out = partner.dtrace_fire(
            daemon.state_dir,
            'rdtmain$target::fire_ticks:tick { printf("tick %d\\n", args[0]); }'
            ' rdtmain$target::fire_ticks:done-all { printf("done %d\\n", args[0]); exit(0); }',
            host,
            trigger=lambda: prog.command("f 3"),
            duration=240,
            root=root,
        )
        assert out.stdout.split() == ["tick", "0", "tick", "1", "tick", "2", "done", "3"], out
    finally:
        status, err = prog.quit()
    assert status == 0, err
    daemon.wait_for("exit pruning", lambda: host not in daemon.stash_pids(), timeout=120)
    daemon.verify()


@pytest.fixture
def shared_dir(shm: Path) -> Iterator[Path]:
    """A directory for the helper that is a *shared* mount: a FUSE mount the daemon makes
    in it later reaches the containers (their copies are its slaves).  Nothing else on
    this machine is a shared mount, so the test makes this one (and undoes it)."""
    hdir = shm / "hdir"
    hdir.mkdir()
    hdir.chmod(0o755)
    subprocess.run(["mount", "--bind", str(hdir), str(hdir)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(hdir)], check=True)
        yield hdir
    finally:
        subprocess.run(["umount", "-l", str(hdir)], check=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_container_started_before_the_daemon_is_caught_up(
    shm: Path,
    shared_dir: Path,
    root: Path,
    image: tuple[Path, dict[str, sd.BuiltObject]],
    progs: partner.Programs,
    variant: str,
) -> None:
    """Both programs start while nothing serves the helper (their constructors fail), then
    the daemon starts, catches them up under their host pids, and dtrace lists them."""
    userns = _variant(variant)
    layer, objs = image
    pie = objs["pie"]
    helper = shared_dir / "helper"
    helper.write_bytes(b"")  # an empty file, as the daemon finds it: the ioctl fails
    helper.chmod(0o666)
    dof_ctr = Container(
        shm / "ctr-dof",
        [layer, root],
        shared_dir,
        [f"{SUNW_DIR}/{pie.name}"],
        userns=userns,
        env=ENV,
    )
    notes_ctr = Container(
        shm / "ctr-notes",
        [root],
        shared_dir,
        [progs.in_chroot(progs.usdtprog)],
        userns=userns,
        env={**ENV, **partner.CLEAN_ENV},
        text=True,
    )
    dof_prog = sd.SunwProgram(dof_ctr.proc)
    dof_prog.pid = 1
    notes_prog = partner.Program(notes_ctr.proc, 1)
    daemon: DaemonHandle | None = None
    try:
        dof_ctr.ready(dof_prog.read_line)
        notes_ctr.ready(notes_prog.read_line)
        info = dof_prog.info()
        assert (info["gen"], info["errno"]) == ("-1", "25"), info  # ENOTTY: a plain file
        daemon = start_daemon(shm, device=helper, extra_args=["--prune-interval", "0.2"])
        daemon.wait_for(
            "the start-up catch-up",
            lambda: "catch-up: " in daemon.log_text() and "scanned" in daemon.log_text(),
            timeout=120,
        )
        log = daemon.log_text()
        for ctr, name in ((dof_ctr, pie.name), (notes_ctr, "usdtprog")):
            host = ctr.pid
            assert ctr.nspid() == [host, 1]
            key = maps_key(host, name)
            # caught-up generations start at 1: the process holds -1 from its failed ioctl
            assert generations(daemon.state_dir, host) == {1: key}, log
            assert f"catch-up: {host}: registered" in log, log
        assert set(probe_files(daemon.state_dir, dof_ctr.pid)) == {
            "ctrmain:ctrpie:ctrmain_tick:tick"
        }
        assert {n.split(":")[0] for n in probe_files(daemon.state_dir, notes_ctr.pid)} == {
            "rdtmain"
        }
        base = maps_base(dof_ctr.pid, pie.name)
        dof_key = maps_key(dof_ctr.pid, pie.name)
        mapping = daemon.state_dir / "stash" / "dof-pid" / str(dof_ctr.pid) / dof_key
        assert (mapping / "dh").read_bytes() == pie.helper(base)  # what drti would have sent
        daemon.verify()
        with partner.mounted(root=root, binds=[daemon.state_dir]):
            listed = partner.dtrace_list(daemon.state_dir, "ctr*", root=root)
            assert (f"ctrmain{dof_ctr.pid}", "ctrpie", "ctrmain_tick", "tick") in {
                (r.provider, r.module, r.function, r.name) for r in listed.rows
            }, listed
            listed = partner.dtrace_list(daemon.state_dir, f"rdtmain{notes_ctr.pid}", root=root)
            assert len(listed.rows) == 4, listed
            # and fires the caught-up probes (one CPU: the buffer comes in order)
            os.sched_setaffinity(notes_ctr.pid, {min(os.sched_getaffinity(0))})
            out = partner.dtrace_fire(
                daemon.state_dir,
                'rdtmain$target::fire_ticks:tick { printf("tick %d\\n", args[0]); }'
                ' rdtmain$target::fire_ticks:done-all { printf("done %d\\n", args[0]);'
                " exit(0); }",
                notes_ctr.pid,
                trigger=lambda: notes_prog.command("f 3"),
                duration=240,
                root=root,
            )
            assert out.stdout.split() == ["tick", "0", "tick", "1", "tick", "2", "done", "3"], out
    except BaseException:
        if daemon is not None:
            daemon.cleanup_hard()
        raise
    finally:
        for prog in (dof_prog, notes_prog):
            with contextlib.suppress(Exception):
                prog.quit()
    assert daemon is not None
    daemon.wait_for(
        "exit pruning",
        lambda: not {dof_ctr.pid, notes_ctr.pid} & set(daemon.stash_pids()),
        timeout=120,
    )
    daemon.verify()
    finish(daemon)
