"""The real Oracle DTrace 2.0.7 (Debian sid, in a chroot) as a test partner.

Debian packages dtrace 2.0.7 only in sid (it needs glibc >= 2.38), so the consumer, ``dtrace
-h``/``dtrace -G``, drti.o and the programs built with them run in a chroot that
``chroot.sh`` builds once per machine at a fixed path (default
``/var/cache/dtprobed-py/sid-dtrace``, env ``DTPROBED_DTRACE_CHROOT``). Standard library only.

What a test does::

    root = ensure_chroot()
    progs = build_programs()                       # cached by content hash
    with mounted(binds=[state_dir, helper_path]):  # /proc /sys /dev ... and the test's paths
        prog = Program.start(progs.usdtprog, devname=helper_path)
        rows = dtrace_list(state_dir, "rdtmain*")
        out = dtrace_fire(state_dir, "rdtmain$target:::tick { @ = count(); }", prog.pid,
                          trigger=lambda: prog.command("f 3"))
        prog.quit()

How a program is started (``Program.start``): ``chroot ROOT /var/cache/.../usdtprog`` with a
clean environment. chroot(8) execs the program, so ``Popen.pid`` is the program's pid, and
it is the same pid on the host (a chroot is not a pid namespace): the daemon under test sees
that pid in the FUSE/CUSE request, and ``/proc/PID/root`` is the chroot. drti 2.0.7 opens the
path in ``DTRACE_DOF_INIT_DEVNAME`` as it is (any path, not only ``/dev/NAME``; default
``/dev/dtrace/helper``), resolved inside the chroot: so the private daemon's helper file is
bind-mounted into the chroot at the same path (``mounted(binds=[helper])``) and the program
gets ``DTRACE_DOF_INIT_DEVNAME=<that path>``.

drti 2.0.7 behaviour, observed with strace in the chroot (see README.md next to this file):
the constructor opens the helper ``O_RDWR`` and sends ``DTRACEHIOC_HASUSDT`` (0x4008D804)
whose argument is, by value, the address of drti's ``dtrace_dof_init`` inside the object
that carries the notes (executable or shared library: each has its own drti copy); fork
children register again (pthread_atfork child handler); the destructor sends
``DTRACEHIOC_REMOVE`` (0x4004D802) with the generation by value: -1 when the registration
failed.

The mounts (``mounted``) live in the host's mount namespace, next to the chroot's own files:
several tests (and several processes) may use them at once, so they are shared and counted:
each user holds a shared flock on ``ROOT.users.lock``; the mounts this module made are
listed in ``ROOT.mounts``; the last user leaving unmounts exactly those (and only those), in
reverse order. The per-test ``binds`` are mounted and unmounted by their own user.

When the kernel lacks something dtrace needs, ``PartnerError`` says why in one line. Tests
do not skip on it: on this machine kind everything is present.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHROOT_SH = HERE / "chroot.sh"
PROGS_SRC = HERE / "progs"
DEFAULT_ROOT = "/var/cache/dtprobed-py/sid-dtrace"
#: A copy of the chroot's /usr/lib/x86_64-linux-gnu/dtrace without io.d (path in the chroot):
#: this kernel has no CONFIG_KALLSYMS_ALL, and io.d then fails every D compile.
SYSLIBDIR = "/opt/dtprobed-py/dtrace-syslib"
#: Where build_programs() keeps its builds (path in the chroot), one directory per hash.
PROGS_CACHE = "/var/cache/dtprobed-py/progs"
#: Environment of everything run in the chroot: nothing of the host's leaks in (in particular
#: no DTRACE_DOF_INIT_* of the test runner).
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}


class PartnerError(RuntimeError):
    """The real dtrace cannot be used here; the message is one line saying why."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def chroot_root() -> Path:
    """The chroot's directory on the host (``DTPROBED_DTRACE_CHROOT`` or the default)."""
    return Path(os.environ.get("DTPROBED_DTRACE_CHROOT", DEFAULT_ROOT).rstrip("/") or "/")


def host_path(root: Path, inside: str) -> Path:
    """The host path of ``inside``, a path in the chroot."""
    return root / inside.lstrip("/")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "(no output)"


def ensure_chroot(timeout: float = 1800.0) -> Path:
    """Build the chroot if needed (``chroot.sh``, idempotent, locked); return its path."""
    try:
        proc = subprocess.run(
            ["bash", str(CHROOT_SH)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "DTPROBED_DTRACE_CHROOT": str(chroot_root())},
        )
    except subprocess.TimeoutExpired as exc:
        raise PartnerError(f"chroot.sh did not finish within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise PartnerError(f"chroot.sh failed: {_last_line(proc.stderr)}")
    return Path(_last_line(proc.stdout))


# --------------------------------------------------------------------------- mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[str]:
    """Mount points of this mount namespace, in mount order (from /proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


def _is_mount_point(path: Path) -> bool:
    return str(path) in mount_points()


def _run_mount(args: Sequence[str], what: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PartnerError(f"cannot mount {what}: {_last_line(proc.stderr)}")


def _umount(path: Path) -> None:
    proc = subprocess.run(["umount", str(path)], capture_output=True, text=True)
    if proc.returncode != 0 and _is_mount_point(path):
        # Busy (a test's process still runs in there): detach it now, it goes when freed.
        subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)


def _bind(src: str, dst: Path) -> None:
    _run_mount(["--bind", src, str(dst)], f"{src} on {dst}")
    # Our own propagation: nothing mounted below dst reaches src's mount (or the reverse).
    try:
        _run_mount(["--make-private", str(dst)], f"{dst} private")
    except PartnerError:
        _umount(dst)
        raise


def _base_mounts(root: Path) -> list[tuple[Path, Callable[[Path], None]]]:
    """The mounts dtrace needs in the chroot, in mounting order."""

    def fs(fstype: str) -> Callable[[Path], None]:
        return lambda p: _run_mount(["-t", fstype, "nodev", str(p)], f"{fstype} on {p}")

    return [
        (root / "proc", lambda p: _bind("/proc", p)),
        (root / "sys", lambda p: _bind("/sys", p)),
        (root / "dev", lambda p: _bind("/dev", p)),
        (root / "dev/shm", lambda p: _bind("/dev/shm", p)),
        (root / "sys/kernel/tracing", fs("tracefs")),
        # dtrace 2.0.7 hard-codes /sys/kernel/debug/tracing: even BEGIN fails without it.
        (root / "sys/kernel/debug", fs("debugfs")),
    ]


def _check_kernel(root: Path) -> None:
    """One-line reasons for what this kernel lacks (the partner must not be silently skipped)."""
    if not Path("/sys/kernel/btf/vmlinux").exists():
        raise PartnerError("kernel has no BTF (/sys/kernel/btf/vmlinux): dtrace 2.0.7 needs it")
    if not (root / "sys/kernel/tracing/uprobe_events").exists():
        raise PartnerError("kernel lacks uprobes (no uprobe_events in tracefs): USDT needs it")
    if not (root / "sys/kernel/debug/tracing").is_dir():
        raise PartnerError("debugfs has no tracing/ directory: dtrace 2.0.7 hard-codes it")


@contextlib.contextmanager
def _flocked(path: Path, how: int) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, how)
        yield fd
    finally:
        os.close(fd)


def _record_path(root: Path) -> Path:
    return Path(f"{root}.mounts")


def _read_record(root: Path) -> list[str]:
    try:
        return [ln for ln in _record_path(root).read_text().splitlines() if ln]
    except FileNotFoundError:
        return []


def _write_record(root: Path, points: list[str]) -> None:
    tmp = Path(f"{_record_path(root)}.tmp")
    tmp.write_text("".join(p + "\n" for p in points))
    tmp.replace(_record_path(root))


def _unmount_recorded(root: Path) -> None:
    current = set(mount_points())
    for point in reversed(_read_record(root)):
        if point in current:
            _umount(Path(point))
    _write_record(root, [])


def _target_for(root: Path, path: Path) -> Path:
    target = root / str(path).lstrip("/")
    if path.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch()
    return target


@contextlib.contextmanager
def mounted(
    binds: Sequence[str | os.PathLike[str]] = (), root: Path | None = None
) -> Iterator[Path]:
    """Mount what the real dtrace needs in the chroot, and ``binds`` at their own paths.

    ``binds`` are host paths (a state directory, the private daemon's helper file) made
    visible at the same path in the chroot; a file or directory missing in the chroot is
    created as the mount point (and left there: empty, harmless). Yields the chroot path.
    """
    root = root or chroot_root()
    if not (root / ".dtprobed-py-ready").exists():
        raise PartnerError(f"no ready chroot at {root}: call ensure_chroot() first")
    users_lock = Path(f"{root}.users.lock")
    mounts_lock = Path(f"{root}.mounts.lock")
    user_fd = os.open(users_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    mine: list[Path] = []
    try:
        with _flocked(mounts_lock, fcntl.LOCK_EX):
            fcntl.flock(user_fd, fcntl.LOCK_SH)
            record = _read_record(root)
            try:
                for point, do_mount in _base_mounts(root):
                    if not _is_mount_point(point):
                        point.mkdir(parents=True, exist_ok=True)
                        do_mount(point)
                        record.append(str(point))
                        _write_record(root, record)
                _check_kernel(root)
            except BaseException:
                _release(root, user_fd)
                user_fd = -1
                raise
        for src in binds:
            src_path = Path(os.fspath(src)).resolve()
            target = _target_for(root, src_path)
            _bind(str(src_path), target)
            mine.append(target)
        yield root
    finally:
        for target in reversed(mine):
            _umount(target)
        if user_fd >= 0:
            with _flocked(mounts_lock, fcntl.LOCK_EX):
                _release(root, user_fd)


def _release(root: Path, user_fd: int) -> None:
    """Drop this user's share; the last user unmounts what the partner mounted.

    The caller holds ``ROOT.mounts.lock``, so no new user can come in meanwhile.
    """
    os.close(user_fd)
    try:
        with _flocked(Path(f"{root}.users.lock"), fcntl.LOCK_EX | fcntl.LOCK_NB):
            _unmount_recorded(root)
    except BlockingIOError:
        pass  # another user still needs them


# ------------------------------------------------------------------ running in the chroot


def run_in_chroot(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    cwd: str = "/",
    root: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the chroot (mounts must be in place), capturing text output."""
    root = root or chroot_root()
    cmd = ["chroot", str(root), "sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *argv]
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**CLEAN_ENV, **(env or {})}
        )
    except subprocess.TimeoutExpired as exc:
        raise PartnerError(
            f"{argv[0]} did not finish within {timeout:.0f} s in the chroot"
        ) from exc


def dtrace_argv(state_dir: str | os.PathLike[str], *args: str) -> list[str]:
    """``dtrace`` with the stash path and the io.d-less syslibdir, then ``args``."""
    return [
        "dtrace",
        f"-xdofstashpath={os.fspath(state_dir)}",
        f"-xsyslibdir={SYSLIBDIR}",
        *args,
    ]


def dtrace_version(root: Path | None = None) -> str:
    """The chroot's ``dtrace -V`` line, e.g. ``dtrace: D 2.0.7`` (needs no mounts)."""
    proc = run_in_chroot(["dtrace", "-V"], root=root)
    if proc.returncode != 0:
        raise PartnerError(f"dtrace -V failed: {_last_line(proc.stderr)}")
    return proc.stdout.strip()


@dataclass(frozen=True)
class ProbeRow:
    """One row of ``dtrace -l``."""

    id: int
    provider: str
    module: str
    function: str
    name: str


@dataclass(frozen=True)
class ListResult:
    """``dtrace -l`` output: the parsed rows plus the raw status (no match exits 1)."""

    rows: list[ProbeRow]
    returncode: int
    stderr: str


_HEADER = re.compile(r"^\s*ID\s+PROVIDER\s+MODULE\s+FUNCTION\s+NAME\s*$")


def parse_list(stdout: str) -> list[ProbeRow]:
    """Rows of ``dtrace -l`` output.

    dtrace 2.0.7 prints the header ``   ID   PROVIDER            MODULE      FUNCTION NAME``
    and each row with every column but NAME right-aligned; module and function may be empty
    (``    1     dtrace              BEGIN``). With 4 words, the third is the module if it ends
    nearer the header's MODULE column than its FUNCTION column.
    """
    lines = stdout.splitlines()
    if not lines:
        return []
    header = lines[0]
    if not _HEADER.match(header):
        raise PartnerError(f"unexpected dtrace -l header: {header!r}")
    mod_end = header.index("MODULE") + len("MODULE")
    func_end = header.index("FUNCTION") + len("FUNCTION")
    rows: list[ProbeRow] = []
    for line in lines[1:]:
        words = [(m.group(), m.end()) for m in re.finditer(r"\S+", line)]
        if not words:
            continue
        names = [w for w, _ in words]
        if len(words) == 5:
            ident, prov, mod, func, name = names
        elif len(words) == 3:
            ident, prov, name = names
            mod = func = ""
        elif len(words) == 4:
            ident, prov, third, name = names
            third_end = words[2][1]
            if abs(third_end - mod_end) < abs(third_end - func_end):
                mod, func = third, ""
            else:
                mod, func = "", third
        else:
            raise PartnerError(f"unexpected dtrace -l row: {line!r}")
        rows.append(ProbeRow(int(ident), prov, mod, func, name))
    return rows


def dtrace_list(
    state_dir: str | os.PathLike[str],
    pattern: str,
    *,
    timeout: float = 60.0,
    check: bool = True,
    root: Path | None = None,
) -> ListResult:
    """``dtrace -xdofstashpath=STATE -l -P PATTERN`` in the chroot (mounts in place).

    No match is not an error (dtrace 2.0.7 exits 0: no rows, "No probe matches description"
    on stderr). With ``check``, a non-zero exit raises PartnerError with dtrace's last line.
    """
    proc = run_in_chroot(dtrace_argv(state_dir, "-l", "-P", pattern), timeout=timeout, root=root)
    if check and proc.returncode != 0:
        raise PartnerError(f"dtrace -l failed ({proc.returncode}): {_last_line(proc.stderr)}")
    return ListResult(parse_list(proc.stdout), proc.returncode, proc.stderr)


@dataclass(frozen=True)
class FireResult:
    """What ``dtrace -n SCRIPT -p PID`` printed.

    ``matched``: the probes the script matched (from dtrace's "matched N probes" lines,
    printed only when not quiet), None when quiet."""

    returncode: int
    stdout: str
    stderr: str
    matched: int | None


_MATCHED = re.compile(r"^dtrace: description '.*' matched (\d+) probes?$", re.M)


#: Printed by an extra ``BEGIN`` clause: dtrace has enabled every probe when it appears.
READY_MARKER = "dtprobed-py-partner: tracing"


def dtrace_fire(
    state_dir: str | os.PathLike[str],
    script: str,
    pid: int,
    *,
    trigger: Callable[[], object] | None = None,
    duration: float = 30.0,
    start_timeout: float = 60.0,
    quiet: bool = True,
    check: bool = True,
    extra_args: Sequence[str] = (),
    root: Path | None = None,
) -> FireResult:
    """Run ``dtrace [-q] -n SCRIPT -p PID`` in the chroot; return its output.

    An extra ``-n 'BEGIN { printf(READY_MARKER) }'`` tells when dtrace has enabled the
    probes (``-q`` hides its "matched N probes" line): then ``trigger`` is called (e.g.
    ``lambda: prog.command("f 3")``). dtrace then runs until it exits (the script's
    ``exit(0)``, or the target's exit) or ``duration`` seconds have passed; then it gets
    SIGINT (it prints its aggregations and exits) and, 10 s later, SIGKILL. The marker line
    is removed from the returned stdout. Only one ``dtrace -p`` per target process at a time.
    With ``check``, dtrace exiting before it traced (a compile error, no such probe, a
    kernel that refuses the BPF program) raises PartnerError with dtrace's last line.
    """
    root = root or chroot_root()
    marker = f'BEGIN {{ printf("%s\\n", "{READY_MARKER}"); }}'
    argv = dtrace_argv(
        state_dir,
        *(["-q"] if quiet else []),
        *extra_args,
        "-n",
        marker,
        "-n",
        script,
        "-p",
        str(pid),
    )
    proc = subprocess.Popen(
        ["chroot", str(root), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=CLEAN_ENV,
    )
    out = bytearray()
    err = bytearray()
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}

    def pump(until: float, stop: Callable[[], bool]) -> None:
        while streams and not stop() and time.monotonic() < until:
            ready, _, _ = select.select(list(streams), [], [], max(0.0, until - time.monotonic()))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if chunk:
                    streams[fd].extend(chunk)
                else:
                    del streams[fd]

    def tracing() -> bool:
        return READY_MARKER.encode() in out

    try:
        pump(time.monotonic() + start_timeout, tracing)
        if tracing():
            if trigger is not None:
                trigger()
            pump(time.monotonic() + duration, lambda: False)
        elif proc.poll() is None and streams:
            raise PartnerError(f"dtrace -p {pid} did not start within {start_timeout:.0f} s")
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            pump(time.monotonic() + 10.0, lambda: False)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if check and not tracing():
        raise PartnerError(
            f"dtrace -p {pid} failed ({proc.returncode}): {_last_line(err.decode(errors='replace'))}"
        )
    text = out.decode(errors="replace")
    text = "".join(ln for ln in text.splitlines(keepends=True) if READY_MARKER not in ln)
    stderr = err.decode(errors="replace")
    counts = [int(n) for n in _MATCHED.findall(stderr)][1:]  # the first is the marker's
    return FireResult(proc.returncode, text, stderr, sum(counts) if counts else None)


# ------------------------------------------------------------------------ test programs


@dataclass(frozen=True)
class Programs:
    """The built test programs: host paths, and the same files' paths in the chroot."""

    dir: Path  # on the host
    inside: str  # the same directory, in the chroot

    @property
    def usdtprog(self) -> Path:
        return self.dir / "usdtprog"

    @property
    def libusdtlib(self) -> Path:
        return self.dir / "libusdtlib.so"

    def in_chroot(self, host: Path) -> str:
        """The chroot path of one of these files."""
        return f"{self.inside}/{host.relative_to(self.dir)}"


def _sources_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(PROGS_SRC.iterdir()):
        if path.is_file() and path.suffix in {".c", ".d", ".sh", ".h"}:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    stamp = root / ".dtprobed-py-ready"
    dtrace_line = [ln for ln in stamp.read_text().splitlines() if ln.startswith("dtrace=")]
    h.update("".join(dtrace_line).encode())
    return h.hexdigest()[:16]


def build_programs(root: Path | None = None, timeout: float = 300.0) -> Programs:
    """Build ``progs/`` in the chroot with ``progs/build.sh`` (``dtrace -h``, ``dtrace -G``,
    gcc), cached under the chroot's ``/var/cache/dtprobed-py/progs/HASH``; return the paths.

    Sets up its own mounts (dtrace -h/-G read the kernel's BTF through /sys).
    """
    root = root or chroot_root()
    digest = _sources_hash(root)
    inside = f"{PROGS_CACHE}/{digest}"
    out = host_path(root, inside)
    progs = Programs(out, inside)
    if (out / ".built").exists():
        return progs
    cache = out.parent
    cache.mkdir(parents=True, exist_ok=True)
    with _flocked(cache / ".lock", fcntl.LOCK_EX):
        if (out / ".built").exists():
            return progs
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=cache))
        try:
            for path in PROGS_SRC.iterdir():
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
            with mounted(root=root):
                proc = run_in_chroot(
                    ["sh", "build.sh"], cwd=f"{PROGS_CACHE}/{tmp.name}", timeout=timeout, root=root
                )
            if proc.returncode != 0:
                (tmp / "build.log").write_text(proc.stdout + proc.stderr)
                raise PartnerError(f"building the test programs failed: {_last_line(proc.stderr)}")
            (tmp / "build.log").write_text(proc.stdout + proc.stderr)
            (tmp / ".built").touch()
            tmp.chmod(0o755)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return progs


class Program:
    """A test program running in the chroot, driven by one-line commands (see usdtprog.c)."""

    def __init__(self, proc: subprocess.Popen[str], pid: int) -> None:
        self.proc = proc
        self.pid = pid
        self._buf = bytearray()
        #: Lines read by expect() that did not match: kept, in order, for later reads.
        self._pending: list[str] = []

    @classmethod
    def start(
        cls,
        path: Path,
        *,
        devname: str | os.PathLike[str] | None,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        root: Path | None = None,
        timeout: float = 30.0,
    ) -> Program:
        """Start ``path`` (a host path under the chroot) in the chroot; wait for "PID ready".

        ``devname`` (required): the helper it registers with (``DTRACE_DOF_INIT_DEVNAME``, a
        path valid in the chroot: bind-mount a host helper at the same path with
        ``mounted(binds=...)``). ``None`` leaves drti's default ``/dev/dtrace/helper``, which
        is the HOST's (``/dev`` is bind-mounted): the machine's own daemon, if any.
        """
        root = root or chroot_root()
        inside = "/" + str(Path(path).resolve().relative_to(root.resolve()))
        full_env = {**CLEAN_ENV, **(env or {})}
        if devname is not None:
            full_env["DTRACE_DOF_INIT_DEVNAME"] = os.fspath(devname)
        # One CPU for the program (and its fork children): dtrace keeps one buffer per
        # CPU and prints them one CPU after another, so a thread that migrates between
        # two probes could see its lines printed out of order.
        cpu = min(os.sched_getaffinity(0))
        proc = subprocess.Popen(
            ["chroot", str(root), inside, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        )
        prog = cls(proc, proc.pid)
        try:
            line = prog.read_line(timeout)
        except PartnerError:
            prog.kill()
            raise
        if line != f"{proc.pid} ready":
            prog.kill()
            raise PartnerError(f"{path.name} did not start: {line!r}")
        return prog

    def read_line(self, timeout: float = 30.0) -> str:
        """The next line of the program's stdout (without the newline): the oldest line an
        ``expect`` skipped, else a new one.

        Reads the pipe itself (select on a buffered file object would miss lines already
        in its buffer: the parent and a fork child may write two lines at once).
        """
        if self._pending:
            return self._pending.pop(0)
        return self._read_new_line(timeout)

    def _read_new_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                raise PartnerError(f"program {self.pid} said nothing within {timeout:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise PartnerError(
                    f"program {self.pid} closed its output (exit {self.proc.poll()})"
                )
            self._buf.extend(chunk)
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line.decode(errors="replace")

    def command(self, cmd: str, timeout: float = 30.0) -> str:
        """Send one command; return the parent's answer line after "PID ok "."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.expect(f"{self.pid} ", timeout)[len(f"{self.pid} ok ") :]

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """The first line (skipped earlier, or new) that starts with ``prefix``; raise on a
        "PID error" line of the parent.

        Lines that do not match are kept, in order, for later ``expect``/``read_line``
        calls: the parent and a fork child write to the same pipe, in either order (a
        child's "CHILD ready" or answer may come before or after the parent's "ok").
        """
        for i, line in enumerate(self._pending):
            if line.startswith(prefix):
                del self._pending[i]
                return line
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_new_line(max(0.1, deadline - time.monotonic()))
            if line.startswith(f"{self.pid} error"):
                raise PartnerError(f"program {self.pid}: {line}")
            if line.startswith(prefix):
                return line
            self._pending.append(line)

    def quit(self, timeout: float = 30.0) -> tuple[int, str]:
        """Send "q"; return (exit status, stderr), e.g. drti's "DRTI: ..." lines."""
        try:
            _, err = self.proc.communicate(input="q\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PartnerError(f"program {self.pid} did not exit within {timeout:.0f} s") from None
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
