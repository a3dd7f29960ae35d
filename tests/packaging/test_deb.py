"""The Debian package (packaging/deb) on Debian unstable with Debian's dtrace 2.0.7.

The package is built from this tree (``packaging/deb/build.sh``), then
installed with apt in a private Debian unstable machine: an overlay of
``tests/packaging/deb-chroot.sh``'s cached chroot (a copy of the shared
dtrace 2.0.7 chroot, plus systemd and lintian), booted with its own systemd
262 as pid 1 of new pid, mount and cgroup namespaces
(``nested-systemd-chroot.sh``). Upstream's C dtprobed (libdtrace2) is
installed and enabled there, and fails to start: this kernel has no CUSE.

The scenario, in order (each step's duration is printed):

1. ours installs, diverts upstream's six files, is enabled and serves
   /dev/dtrace/helper (FUSE mode); a program built with the chroot's
   ``dtrace -G`` registers through it at start-up and the real ``dtrace -l``
   lists its probes;
2. the stash outlives ``systemctl stop`` (the package's drop-in) and the
   next daemon adopts it;
3. ``apt-get install --reinstall libdtrace2``: ours still serves, upstream's
   files stay diverted; then a reinstall of ours (the upgrade path): the
   daemon restarted, the registered program still listed;
4. ``systemctl daemon-reexec``, then a reboot (systemd killed and booted
   again on the same disk): ours comes up at boot and serves;
5. ``apt-get purge dtprobed-py``: the diversions are gone, upstream's unit
   and binary are back byte for byte and enabled, the postrm asks to start
   it (recorded by a policy-rc.d that refuses only that start, so that the
   stash can be seen kept), nothing of ours is left but the stash; started
   by hand, the unit runs upstream's binary (which fails: no CUSE here).

Separately: the same .deb on Debian 12 (python3 3.11, systemd 252, no
libdtrace2): install, serve, an ADDDOF client registers, reboot, purge
(unit, enablement and files gone); sid's lintian on the .deb reports
nothing but what packaging/deb/lintian-overrides and README.md explain; and
in the CUSE VM (marker ``realkernel``), ours and then upstream's daemon
serve the helper as a CUSE device (deb-cuse-guest.sh).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.packaging.conftest import REPO
from tests.packaging.test_systemd import _find_pid1, remove_cgroup_tree
from tests.realdtrace import partner
from tests.support.clients import code_dof, code_file, write_dof

HERE = Path(__file__).resolve().parent
BUILD = REPO / "packaging" / "deb" / "build.sh"
DEB_CHROOT = HERE / "deb-chroot.sh"
NESTED = HERE / "nested-systemd-chroot.sh"
CUSE_GUEST = HERE / "deb-cuse-guest.sh"
VM_TOOL = REPO / "tools" / "cuse-vm" / "cuse-vm.sh"
VM_TIMEOUT_S = 600
#: Downloaded wheels, kept between runs outside the clone (build.sh --wheels).
WHEEL_CACHE = Path("/var/cache/dtprobed-py/wheels")
WORK_IN_NS = "/run/dtprobed-test"
SYSLIBDIR = partner.SYSLIBDIR
FUSE_SUPER_MAGIC = "65735546"
DIVERTED = [
    line
    for line in (REPO / "packaging" / "deb" / "diversions").read_text().splitlines()
    if line.startswith("/")
]
BOOT_TIMEOUT = 60.0

# A cold machine builds both chroots (~35 s + ~55 s) and the test programs (~11 s)
# inside the first test's fixtures; warm, the file takes ~60 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _need(condition: bool, what: str) -> None:
    if not condition:
        pytest.fail(f"test_deb needs {what}", pytrace=False)


def _requirements() -> None:
    _need(os.geteuid() == 0, "root")
    for tool in ("unshare", "nsenter", "dpkg-deb", "strip", "pivot_root"):
        _need(shutil.which(tool) is not None, f"{tool} on PATH")
    _need(Path("/dev/fuse").exists(), "/dev/fuse")
    _need(
        cgroup2_root() is not None, "a cgroup2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified)"
    )


def cgroup2_root() -> Path | None:
    for path in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (path / "cgroup.procs").exists() and (path / "cgroup.controllers").exists():
            return path
    return None


@dataclass
class Timings:
    steps: list[tuple[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.steps.append((name, time.monotonic() - start))

    def report(self) -> str:
        return "\n".join(f"  {seconds:6.1f} s  {name}" for name, seconds in self.steps)


@pytest.fixture(scope="module")
def timings() -> Iterator[Timings]:
    t = Timings()
    yield t
    print("\ntest_deb durations:\n" + t.report())


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory, timings: Timings) -> Path:
    """The .deb, built from this tree."""
    _requirements()
    out = tmp_path_factory.mktemp("deb")
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    with timings.step("build the .deb (build.sh)"):
        proc = subprocess.run(
            ["bash", str(BUILD), "--out", str(out), "--wheels", str(WHEEL_CACHE)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    assert proc.returncode == 0, f"build.sh failed:\n{proc.stdout}\n{proc.stderr}"
    debs = list(out.glob("dtprobed-py_*_amd64.deb"))
    assert len(debs) == 1, debs
    return debs[0]


def _deb_chroot(suite: str, timings: Timings) -> Iterator[Path]:
    """deb-chroot.sh SUITE's tree, held (shared flock on DIR.lock) while the module uses
    it: a rebuild by another run waits for the overlays booted on it here."""
    _requirements()
    with timings.step(f"the cached {suite} chroot (deb-chroot.sh {suite})"):
        proc = subprocess.run(
            ["bash", str(DEB_CHROOT), suite], capture_output=True, text=True, timeout=1800
        )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.fail(f"deb-chroot.sh {suite} failed: {tail}", pytrace=False)
    root = Path(proc.stdout.strip().splitlines()[-1])
    fd = os.open(f"{root}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not (root / ".dtprobed-deb-ready").exists():  # rebuilt in between
            pytest.fail(f"{root} is being rebuilt: run again", pytrace=False)
        yield root
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def chroot(timings: Timings) -> Iterator[Path]:
    """The cached Debian unstable chroot with dtrace 2.0.7, systemd and lintian."""
    yield from _deb_chroot("sid", timings)


@pytest.fixture(scope="module")
def bookworm(timings: Timings) -> Iterator[Path]:
    """The cached Debian 12 chroot with systemd (Debian 12 has no dtrace package)."""
    yield from _deb_chroot("bookworm", timings)


# --------------------------------------------------------------------- the machine


class Machine:
    """A Debian unstable machine: systemd as pid 1 on an overlay of the chroot."""

    def __init__(self, lower: Path, work: Path) -> None:
        self.lower = lower
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.cgroup: Path | None = None
        self.boots = 0

    def boot(self) -> None:
        root = cgroup2_root()
        assert root is not None
        self.boots += 1
        self.cgroup = root / f"dtprobed-deb-{uuid.uuid4().hex[:8]}"
        self.cgroup.mkdir()
        script = (
            f'echo $$ > "{self.cgroup}/cgroup.procs"; '
            "exec unshare --pid --fork --mount --cgroup --propagation private "
            f'bash "{NESTED}" "{self.lower}" "{self.work}"'
        )
        console = (self.work / f"console.{self.boots}.log").open("wb")
        self.proc = subprocess.Popen(
            ["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=console, stderr=console
        )
        console.close()
        deadline = time.monotonic() + BOOT_TIMEOUT
        pid1 = None
        while pid1 is None:
            if self.proc.poll() is not None:
                pytest.fail(f"the machine did not boot: {self.console()}")
            assert time.monotonic() < deadline, "systemd did not start"
            time.sleep(0.05)
            pid1 = _find_pid1(self.proc.pid)
        self.pid1 = pid1
        while self.run("systemctl", "is-system-running").stdout.strip() not in (
            "running",
            "degraded",
        ):
            assert time.monotonic() < deadline, (
                f"systemd did not finish booting\n{self.run('systemctl', 'list-jobs').stdout}"
            )
            time.sleep(0.1)

    def shutdown(self) -> None:
        """Power off at once (SIGKILL to pid 1: everything in the namespaces goes)."""
        if self.proc is None:
            return
        pid1 = _find_pid1(self.proc.pid)
        if pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid1, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(30)
        self.proc = None
        if self.cgroup is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(
                p.read_text().strip() for p in self.cgroup.rglob("cgroup.procs")
            ):
                time.sleep(0.05)
            # A cgroup whose last tasks are still exiting refuses rmdir (EBUSY) a while.
            while True:
                remove_cgroup_tree(self.cgroup)
                if not self.cgroup.exists() or time.monotonic() > deadline + 10:
                    break
                time.sleep(0.1)
            self.cgroup = None

    def console(self) -> str:
        path = self.work / f"console.{self.boots}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def argv(self, *argv: str) -> list[str]:
        return [
            "nsenter",
            "-t",
            str(self.pid1),
            "-m",
            "-p",
            "-C",
            "-r",
            "-w",
            "env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL=C",
            "DEBIAN_FRONTEND=noninteractive",
            *argv,
        ]

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*argv), capture_output=True, text=True, timeout=timeout)

    def check(self, *argv: str, timeout: float = 300) -> str:
        proc = self.run(*argv, timeout=timeout)
        assert proc.returncode == 0, (
            f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
        return proc.stdout

    def sh(self, script: str) -> str:
        return self.check("sh", "-c", script)

    def show(self, *props: str) -> dict[str, str]:
        out = self.check("systemctl", "show", "dtprobed.service", "-p", ",".join(props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.run("journalctl", "--no-pager", "-u", "dtprobed.service").stdout[-4000:]

    def wait_active(self, timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.show("ActiveState", "MainPID")
            if state["ActiveState"] == "active":
                return state
            if time.monotonic() > deadline or state["ActiveState"] == "failed":
                pytest.fail(f"dtprobed.service is {state}\n{self.journal()}")
            time.sleep(0.1)

    def diversions(self) -> list[str]:
        out = self.check("dpkg-divert", "--list")
        return sorted(line for line in out.splitlines() if line.endswith(" by dtprobed-py"))

    def md5(self, path: str) -> str:
        return self.check("md5sum", path).split()[0]

    def dpkg_md5(self, package: str, path: str) -> str:
        for line in self.check("cat", f"/var/lib/dpkg/info/{package}.md5sums").splitlines():
            digest, name = line.split(maxsplit=1)
            if "/" + name == path:
                return digest
        raise AssertionError(f"{path} not in {package}.md5sums")


class UsdtProgram:
    """tests/realdtrace/progs/usdtprog, started in the machine (drti registers it)."""

    def __init__(self, machine: Machine) -> None:
        self.proc = subprocess.Popen(
            machine.argv(f"{WORK_IN_NS}/progs/usdtprog"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line.endswith(" ready"):
            self.quit()
            pytest.fail(f"usdtprog did not start: {line!r}")
        self.pid = int(line.split()[0])  # its pid in the machine

    def quit(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("q\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def program(machine: Machine) -> Iterator[UsdtProgram]:
    prog = UsdtProgram(machine)
    try:
        yield prog
    finally:
        prog.quit()


def dtrace_lists(machine: Machine, pid: int) -> list[str]:
    """The probe names the real dtrace lists for provider rdtmainPID (stash /run/dtrace)."""
    out = machine.check("dtrace", f"-xsyslibdir={SYSLIBDIR}", "-l", "-P", f"rdtmain{pid}")
    return sorted({row.name for row in partner.parse_list(out)})


RDTMAIN_PROBES = ["done-all", "start", "tick"]
UNIT_PATHS = ("/usr/lib/systemd/system/dtprobed.service", "/lib/systemd/system/dtprobed.service")


def stashed(machine: Machine, pid: int) -> bool:
    """Whether the stash in /run/dtrace holds a registration of *pid* (docs/stash.md)."""
    return machine.run("test", "-d", f"/run/dtrace/stash/dof-pid/{pid}").returncode == 0


def assert_ours_serves(machine: Machine) -> dict[str, str]:
    """dtprobed.service is ours, active, serving the helper as a FUSE file."""
    state = machine.wait_active()
    show = machine.show("FragmentPath", "ExecStart", "DropInPaths")
    # (systemd 252 of Debian 12 names it by /lib, the same directory on merged /usr)
    assert show["FragmentPath"] in UNIT_PATHS, show
    assert "/usr/sbin/dtprobed" in show["ExecStart"], show
    assert "50-debian-package.conf" in show["DropInPaths"], show
    head = machine.check("head", "-n1", "/usr/sbin/dtprobed").strip()
    assert head == "#!/usr/lib/dtprobed-py/venv/bin/python3 -I", head
    cmdline = machine.check("cat", f"/proc/{state['MainPID']}/cmdline").split("\0")
    assert cmdline[:3] == ["/usr/lib/dtprobed-py/venv/bin/python3", "-I", "/usr/sbin/dtprobed"], (
        cmdline
    )
    fstype = machine.check("stat", "-f", "-c", "%t", "/dev/dtrace/helper").strip()
    assert fstype == FUSE_SUPER_MAGIC, f"/dev/dtrace/helper is not a FUSE file ({fstype})"
    assert machine.check("systemctl", "is-enabled", "dtprobed.service").strip() == "enabled"
    return state


def assert_registers(machine: Machine) -> None:
    """A dtrace -G program registers at start-up; the real dtrace lists its probes."""
    with program(machine) as prog:
        assert dtrace_lists(machine, prog.pid) == RDTMAIN_PROBES, machine.journal()


# ------------------------------------------------------------------------- the tests


def test_deb_takes_over_from_libdtrace2_and_gives_back(
    deb: Path, chroot: Path, tmp_path: Path, timings: Timings
) -> None:
    with timings.step("the dtrace -G test programs (cached)"):
        progs = partner.build_programs()
    (tmp_path / "progs").mkdir()
    for built in (progs.usdtprog, progs.libusdtlib):
        shutil.copy2(built, tmp_path / "progs" / built.name)
    shutil.copy2(deb, tmp_path / deb.name)

    machine = Machine(chroot, tmp_path)
    try:
        with timings.step("boot the machine"):
            machine.boot()
        # Before: upstream's unit, enabled, failed (no CUSE on this kernel).
        before = machine.show("FragmentPath", "ExecStart", "ActiveState")
        assert before["FragmentPath"] == "/usr/lib/systemd/system/dtprobed.service", before
        assert machine.check("systemctl", "is-enabled", "dtprobed.service").strip() == "enabled"
        assert machine.md5("/usr/sbin/dtprobed") == machine.dpkg_md5(
            "libdtrace2", "/usr/sbin/dtprobed"
        )
        assert machine.diversions() == []

        # 1. Install: diversions, enabled, serving, dtrace lists what registered.
        with timings.step("apt-get install ./dtprobed-py.deb (with python3 from the chroot's apt)"):
            out = machine.check("apt-get", "install", "-y", "-q", f"{WORK_IN_NS}/{deb.name}")
        assert "Setting up dtprobed-py" in out, out
        assert machine.diversions() == sorted(
            f"diversion of {p} to {p}.distrib by dtprobed-py" for p in DIVERTED
        )
        assert machine.md5("/usr/sbin/dtprobed.distrib") == machine.dpkg_md5(
            "libdtrace2", "/usr/sbin/dtprobed"
        )
        assert_ours_serves(machine)
        with timings.step("a dtrace -G program registers; the real dtrace -l lists it"):
            assert_registers(machine)

        # 2. The stash outlives a stop; the next daemon adopts it.
        with timings.step("the stash outlives systemctl stop"), program(machine) as prog:
            machine.check("systemctl", "stop", "dtprobed.service")
            assert stashed(machine, prog.pid), machine.sh("find /run/dtrace | head -20")
            machine.check("systemctl", "start", "dtprobed.service")
            assert_ours_serves(machine)
            assert dtrace_lists(machine, prog.pid) == RDTMAIN_PROBES

        # 3. A reinstall of libdtrace2 leaves ours in place.
        with timings.step("apt-get install --reinstall libdtrace2"):
            out = machine.check("apt-get", "install", "-y", "-q", "--reinstall", "libdtrace2")
        assert "Processing triggers for dtprobed-py" in out, out
        assert len(machine.diversions()) == len(DIVERTED)
        assert machine.md5("/usr/lib/systemd/system/dtprobed.service.distrib") == (
            machine.dpkg_md5("libdtrace2", "/usr/lib/systemd/system/dtprobed.service")
        )
        assert_ours_serves(machine)
        assert_registers(machine)

        # 3b. A reinstall of ours (the upgrade path: preinst/prerm/postrm upgrade,
        # postinst configure with the old version): restarted, the stash adopted.
        with (
            timings.step("apt-get install --reinstall ./dtprobed-py.deb"),
            program(machine) as prog,
        ):
            before_pid = assert_ours_serves(machine)["MainPID"]
            out = machine.check(
                "apt-get", "install", "-y", "-q", "--reinstall", f"{WORK_IN_NS}/{deb.name}"
            )
            assert "Setting up dtprobed-py" in out, out
            assert len(machine.diversions()) == len(DIVERTED)
            assert assert_ours_serves(machine)["MainPID"] != before_pid
            assert dtrace_lists(machine, prog.pid) == RDTMAIN_PROBES
            assert machine.run("find", "/usr/lib/dtprobed-py", "-name", "*.pyc").stdout, (
                "postinst byte-compiled nothing"
            )

        # 4. systemd re-executed, then the machine rebooted.
        with timings.step("systemctl daemon-reexec"):
            pid = assert_ours_serves(machine)["MainPID"]
            machine.check("systemctl", "daemon-reexec")
            assert assert_ours_serves(machine)["MainPID"] == pid
        with timings.step("reboot (systemd killed, booted again on the same disk)"):
            machine.shutdown()
            machine.boot()
            assert_ours_serves(machine)
            assert_registers(machine)

        # 5. Purge: upstream's files, enablement and daemon come back; the stash stays.
        machine.sh(
            "printf '%s\\n' '#!/bin/sh' "
            f"'echo \"$1 $2\" >> {WORK_IN_NS}/policy.log' "
            "'[ \"$1 $2\" = \"dtprobed.service start\" ] && exit 101' 'exit 0' "
            "> /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d"
        )
        with program(machine) as prog:
            with timings.step("apt-get purge dtprobed-py"):
                out = machine.check("apt-get", "purge", "-y", "-q", "dtprobed-py")
            assert "Purging configuration files for dtprobed-py" in out, out
            policy = (tmp_path / "policy.log").read_text().splitlines()
            assert policy == ["dtprobed.service stop", "dtprobed.service start"], policy
            assert stashed(machine, prog.pid), "the stash went with the package"
        machine.check("rm", "/usr/sbin/policy-rc.d")
        assert machine.diversions() == []
        for path in DIVERTED:
            assert machine.md5(path) == machine.dpkg_md5("libdtrace2", path), path
        assert machine.check("systemctl", "is-enabled", "dtprobed.service").strip() == "enabled"
        assert machine.check("systemctl", "is-enabled", "dtrace-usdt.target").strip() == "enabled"
        leftovers = machine.sh(
            "ls -d /usr/lib/dtprobed-py /usr/bin/dtprobed-parse /usr/bin/dtprobed-stash "
            "/usr/lib/systemd/system/dtprobed.service.d /usr/share/doc/dtprobed-py "
            "/var/lib/dpkg/info/dtprobed-py.* 2>/dev/null || true"
        ).split()
        assert leftovers == [], leftovers
        status = machine.run("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "dtprobed-py")
        assert status.stdout.strip() in ("", "un"), status
        # Upstream's unit runs upstream's binary now (which needs CUSE: it exits 1 here).
        show = machine.show("FragmentPath", "DropInPaths")
        assert show["FragmentPath"] == "/usr/lib/systemd/system/dtprobed.service", show
        assert show["DropInPaths"] == "", show
        machine.run("systemctl", "start", "dtprobed.service")
        show = machine.show("ExecMainStatus", "ActiveState", "ExecStart")
        assert "path=/usr/sbin/dtprobed" in show["ExecStart"], show
        assert show["ActiveState"] == "failed" and show["ExecMainStatus"] == "1", show
        assert "cuse: device not found" in machine.journal(), machine.journal()
    finally:
        machine.shutdown()


def test_deb_lintian(deb: Path, chroot: Path, tmp_path: Path, timings: Timings) -> None:
    """Debian unstable's lintian: no error or warning that an override does not explain."""
    # The .deb on a tmpfs over the chroot's /tmp, in a mount namespace of its own:
    # nothing is written into the cached chroot.
    script = (
        'mount -t tmpfs tmpfs "$1/tmp" && cp "$2" "$1/tmp/" && exec chroot "$1" '
        "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "
        'lintian --fail-on error,warning --display-info --pedantic "/tmp/$3"'
    )
    with timings.step("lintian (unstable's) on the .deb"):
        proc = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                str(chroot),
                str(deb),
                deb.name,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    tags = [line for line in proc.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:")]
    (tmp_path / "lintian.json").write_text(json.dumps(tags))
    print("\nlintian (Debian unstable):\n" + (proc.stdout or "(nothing)"))
    assert proc.returncode == 0, f"lintian:\n{proc.stdout}\n{proc.stderr}"
    # Every tag left (info, pedantic) is one packaging/deb/README.md explains.
    readme = (REPO / "packaging" / "deb" / "README.md").read_text()
    unexplained = [t for t in tags if t.split()[2] not in readme]
    assert unexplained == [], unexplained


def register_fake_client(machine: Machine) -> tuple[subprocess.Popen[str], int]:
    """tests/support/client.py in the machine, on the package's own interpreter and
    modules (common.*): it registers WORK/probes.dof with ADDDOF at start-up."""
    proc = subprocess.Popen(
        machine.argv(
            "env",
            f"PYTHONPATH={WORK_IN_NS}/support",
            "/usr/lib/dtprobed-py/venv/bin/python3",
            "-m",
            "tests.support.client",
            "--device",
            "/dev/dtrace/helper",
            "--code-file",
            f"{WORK_IN_NS}/code.bin",
            "--register",
            json.dumps({"op": "register", "dof_file": f"{WORK_IN_NS}/probes.dof"}),
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    hello = json.loads(proc.stdout.readline() or "{}")
    if hello.get("register", {}).get("gen") != 0:
        proc.kill()
        pytest.fail(f"registration failed: {hello}\n{machine.journal()}")
    return proc, int(hello["pid"])


def end_fake_client(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write('{"op": "exit"}\n')
        proc.stdin.close()
    proc.wait(30)
    proc.stdout.close()


def assert_fake_client_registers(machine: Machine) -> None:
    proc, pid = register_fake_client(machine)
    try:
        assert stashed(machine, pid), machine.journal()
        assert str(pid) in machine.check("dtprobed-stash", "list", "--json")
    finally:
        end_fake_client(proc)


def test_deb_on_debian_12(deb: Path, bookworm: Path, tmp_path: Path, timings: Timings) -> None:
    """The same .deb on Debian 12 (python3 3.11, systemd 252, no libdtrace2)."""
    support = tmp_path / "support" / "tests" / "support"
    support.mkdir(parents=True)
    (support.parent / "__init__.py").write_text("")
    (support / "__init__.py").write_text("")
    shutil.copy2(REPO / "tests" / "support" / "client.py", support / "client.py")
    code_file(tmp_path)
    write_dof(tmp_path, "probes", code_dof().data)
    shutil.copy2(deb, tmp_path / deb.name)

    machine = Machine(bookworm, tmp_path)
    try:
        with timings.step("Debian 12: boot the machine"):
            machine.boot()
        with timings.step("Debian 12: apt-get install ./dtprobed-py.deb"):
            out = machine.check("apt-get", "install", "-y", "-q", f"{WORK_IN_NS}/{deb.name}")
        assert "Setting up dtprobed-py" in out, out
        version = machine.check("python3", "-c", "import sys; print(sys.version_info[:2])")
        assert version.strip() == "(3, 11)", version
        # The diversions are in place, diverting nothing (no libdtrace2 here).
        assert len(machine.diversions()) == len(DIVERTED)
        assert machine.sh("ls /usr/sbin/dtprobed.distrib 2>/dev/null || true").strip() == ""
        assert_ours_serves(machine)
        with timings.step("Debian 12: a client registers (ADDDOF)"):
            assert_fake_client_registers(machine)
        with timings.step("Debian 12: reboot"):
            machine.shutdown()
            machine.boot()
            assert_ours_serves(machine)
            assert_fake_client_registers(machine)
        with timings.step("Debian 12: apt-get purge dtprobed-py"):
            out = machine.check("apt-get", "purge", "-y", "-q", "dtprobed-py")
        assert "Purging configuration files for dtprobed-py" in out, out
        assert machine.diversions() == []
        # No upstream unit to hand over to: the enablement goes too.
        assert machine.show("LoadState")["LoadState"] == "not-found"
        leftovers = machine.sh(
            "ls -d /usr/lib/dtprobed-py /usr/sbin/dtprobed /usr/lib/systemd/system/dtprobed.service "
            "/usr/lib/systemd/system/dtrace-usdt.target /etc/systemd/system/basic.target.wants/* "
            "/var/lib/systemd/deb-systemd-helper-enabled/dtprobed.service.dsh-also "
            "/var/lib/dpkg/info/dtprobed-py.* 2>/dev/null || true"
        ).split()
        assert leftovers == [], leftovers
    finally:
        machine.shutdown()


@pytest.mark.realkernel
def test_deb_cuse_in_vm(deb: Path, chroot: Path, tmp_path: Path, timings: Timings) -> None:
    """On a kernel with CUSE (tools/cuse-vm): ours, installed from the .deb, serves the
    helper as a CUSE device to a dtrace -G program; after the purge, upstream's daemon
    (back from the diversion) does. In the VM's RAM overlay of the cached unstable tree,
    without systemd (deb-cuse-guest.sh starts each daemon as its unit would)."""
    progs = partner.build_programs()  # before the VM: it may not see host files change
    shutil.copy2(deb, tmp_path / deb.name)
    shutil.copy2(progs.usdtprog, tmp_path / "usdtprog")
    with timings.step("CUSE VM: install, ours serves, purge, upstream serves"):
        proc = subprocess.run(
            [
                str(VM_TOOL),
                "--timeout",
                str(VM_TIMEOUT_S),
                "--mem",
                "2048",
                "--share",
                str(tmp_path),
                "--",
                "sh",
                str(CUSE_GUEST),
                str(chroot),
                str(tmp_path),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=VM_TIMEOUT_S + 120,
        )
    print("\nCUSE VM:\n" + proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].endswith("] ok"), proc.stdout[-4000:]
    assert any("ours: usdtprog" in ln and "registered" in ln for ln in lines), proc.stdout
    assert any("upstream: usdtprog" in ln and "registered" in ln for ln in lines), proc.stdout
