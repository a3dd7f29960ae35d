"""Where a registration's time goes, per process: CPU of each daemon process per registration.

    .venv/bin/python bench/profile_registration.py [--quick] [--strace] [--dir DIR]

A private daemon (FUSE mode, state dir on tmpfs, no debug logging) and real client
processes, one registration at a time, each from a fresh forked process. Cases:

* ``small fresh``: a 3-probe DOF whose bytes differ for every client (each child writes
  and maps its own object file before the timed ioctl): the parser runs every time;
* ``small fork``: the same 3-probe DOF in a mapping every client inherits from this
  process, as a fork child re-registering its parent's DOF (the parse cache answers);
* ``2000 probes`` and ``20000 probes`` (3 arguments each, one function per probe);
* ``HASUSDT 3 probes``: ``tests/parser/fixtures/notes/fx_exec`` mapped in this process,
  ``ioctl(DTRACEHIOC_HASUSDT)`` from each fork child.

At the end, the resident size of each process at rest (every client pruned).
For each case: the client's ioctl wall time (median), and the CPU time (the scheduler's run time of all
its threads, ``/proc/PID/task/*/schedstat``) each process of the daemon used per registration, including its
prune after the client exits: the daemon (receiver, device and exit-watch threads), the
fetch helper, the parser children, the stash writer. With ``--strace`` a second daemon
runs under ``strace -f -c`` for the syscall counts per registration of all its processes
(strace slows everything: its times are not the figures above).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import mmap
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_receiver import Bench, many_dof, small_dof
from common.dof_build import build_helper
from common.ioctl import DTRACEHIOC_ADDDOF
from tests.support.client import CODE_ADDR, CODE_SIZE, map_file, object_bytes
from tests.support.daemon import DaemonHandle, finish, start_daemon

HASUSDT = 0x4008D804
NOTES_OBJECT = Path(__file__).resolve().parents[1] / "tests/parser/fixtures/notes/fx_exec"
#: Mappings the fork children inherit (kept alive here).
_KEEP: list[mmap.mmap] = []


def cpu_seconds(pid: int) -> float:
    """CPU time of all of *pid*'s threads, in seconds (schedstat: nanoseconds, not ticks)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e9


def daemon_roles(daemon: DaemonHandle) -> dict[str, list[int]]:
    roles = daemon.children()
    return {
        "daemon": [daemon.pid],
        "fetch": roles["other"],
        "parser": roles["parser"],
        "writer": roles["writer"],
    }


def cpu_by_role(daemon: DaemonHandle, seen: dict[int, str]) -> dict[int, float]:
    """CPU seconds of every daemon process now (processes seen before are kept)."""
    for role, pids in daemon_roles(daemon).items():
        for pid in pids:
            seen.setdefault(pid, role)
    return {pid: cpu_seconds(pid) for pid in seen}


def fork_register(register: Callable[[], tuple[float, int]], count: int) -> list[float]:
    """*count* fresh forked processes, one after the other, each calling *register*."""
    times: list[float] = []
    for _ in range(count):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                elapsed, result = register()
                os.write(w, f"{elapsed} {result}\n".encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as answer:
            line = answer.read()
        os.waitpid(pid, 0)
        elapsed_s, result_s = line.split()
        if int(result_s) < 0:
            raise RuntimeError(f"registration failed: {result_s}")
        times.append(float(elapsed_s))
    return times


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def timed_ioctl(device: str, request: int, arg: bytearray | int) -> tuple[float, int]:
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        t0 = time.perf_counter()
        try:
            if isinstance(arg, int):  # by value (HASUSDT): libc's ioctl, loaded beforehand
                result = _libc.ioctl(fd, request, arg)
                if result < 0:
                    result = -ctypes.get_errno()
            else:
                result = fcntl.ioctl(fd, request, arg, True)
        except OSError as err:
            result = -(err.errno or 0)
        return time.perf_counter() - t0, result
    finally:
        os.close(fd)


def cases(
    bench: Bench, device: str, workdir: Path, quick: bool
) -> list[tuple[str, int, Callable[[], tuple[float, int]]]]:
    n_small = 100 if quick else 400

    def fresh(make: Callable[[], bytes], base: int = CODE_ADDR) -> Callable[[], tuple[float, int]]:
        """A registration of this child's own object: its provider name carries the pid,
        so no two clients send the same bytes and the parser runs every time."""

        def register() -> tuple[float, int]:
            data = bytearray(make())
            tag = f"b{os.getpid() % 10000:04d}".encode()
            at = data.index(b"bench\0")
            data[at : at + 5] = tag
            path = workdir / f"fresh-{os.getpid()}.obj"
            path.write_bytes(object_bytes(bytes(data)))
            text = mmap.PROT_READ | mmap.PROT_EXEC
            map_file(str(path), CODE_SIZE, text, base, replace=True)
            addr = map_file(str(path), len(data), mmap.PROT_READ, offset=CODE_SIZE)
            helper = bytearray(build_helper("bench", addr=0, dof=addr))
            try:
                return timed_ioctl(device, DTRACEHIOC_ADDDOF, helper)
            finally:
                path.unlink()

        return register

    def adddof(prepare: Callable[[], bytearray]) -> Callable[[], tuple[float, int]]:
        # mapped when the case starts: each case's object text replaces the last one's
        helper: list[bytearray] = []

        def register() -> tuple[float, int]:
            return timed_ioctl(device, DTRACEHIOC_ADDDOF, bytearray(helper[0]))

        def start() -> None:
            helper[:] = [prepare()]

        register.start = start  # type: ignore[attr-defined]
        return register

    def hasusdt() -> tuple[float, int]:
        return timed_ioctl(device, HASUSDT, _mapping_start(NOTES_OBJECT) + 0x100)

    def map_notes() -> None:
        if not _KEEP:
            with open(NOTES_OBJECT, "rb") as f:
                _KEEP.append(
                    mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC)
                )

    hasusdt.start = map_notes  # type: ignore[attr-defined]
    huge_base = CODE_ADDR + 0x1000_0000
    dof2k, dof20k = many_dof(2000, 3), many_dof(20000, 3, huge_base)
    return [
        ("small fresh", n_small, fresh(small_dof)),
        ("small fork", n_small, adddof(lambda: bench.mapped_helper(small_dof()))),
        ("2000 probes", 5 if quick else 20, fresh(lambda: dof2k)),
        ("2000 probes fork", 5 if quick else 20, adddof(lambda: bench.mapped_helper(dof2k))),
        ("20000 probes", 2 if quick else 5, fresh(lambda: dof20k, huge_base)),
        ("HASUSDT 3 probes", n_small, hasusdt),
    ]


def _mapping_start(path: Path) -> int:
    """Where this process maps *path* (the notes object, mapped whole r-x by cases())."""
    real = str(path.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == real and "x" in parts[1]:
            return int(parts[0].split("-")[0], 16)
    raise RuntimeError(f"{path} is not mapped")


def run(quick: bool, state_parent: str, wrap: list[str], only: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="profile-reg-", dir=state_parent) as tmp:
        tmp_path = Path(tmp)
        daemon = start_daemon(tmp_path, debug=False, wrap=wrap)
        try:
            bench = Bench(daemon.device, tmp_path)
            seen: dict[int, str] = {}
            for label, count, register in cases(bench, str(daemon.device), tmp_path, quick):
                if only is not None and label != only:
                    continue
                start = getattr(register, "start", None)
                if start is not None:
                    start()
                fork_register(register, 2)  # warm-up: children started, caches filled
                daemon.wait_for("prune", lambda: daemon.stash_pids() == [], 120)
                before = cpu_by_role(daemon, seen)
                times = fork_register(register, count)
                daemon.wait_for("prune", lambda: daemon.stash_pids() == [], 120)
                after = cpu_by_role(daemon, seen)
                per_role: dict[str, float] = {}
                for pid, role in seen.items():
                    per_role[role] = (
                        per_role.get(role, 0.0) + after.get(pid, 0.0) - before.get(pid, 0.0)
                    )
                total = sum(per_role.values())
                shares = ", ".join(
                    f"{role} {per_role.get(role, 0.0) / count * 1e3:.3f}"
                    for role in ("daemon", "fetch", "parser", "writer")
                )
                print(
                    f"{label:17s} n={count:4d}  ioctl p50 {statistics.median(times) * 1e3:8.2f} ms"
                    f"  CPU ms/registration (incl. prune): {shares}; all {total / count * 1e3:.3f}",
                    flush=True,
                )
            # at rest after the cases (every client pruned): resident size of each process
            rss = {
                role: sum(_rss_kib(pid) for pid in pids)
                for role, pids in daemon_roles(daemon).items()
            }
            print(
                "RSS at rest: "
                + ", ".join(f"{role} {kib / 1024:.1f} MiB" for role, kib in rss.items())
                + f"; all {sum(rss.values()) / 1024:.1f} MiB"
            )
        finally:
            finish(daemon)


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--strace", action="store_true", help="also count syscalls under strace -f -c")
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--only", default=None, help="one case (e.g. 'small fresh')")
    args = ap.parse_args()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    if not args.strace:
        run(args.quick, args.dir, [], args.only)
    else:
        if shutil.which("strace") is None:
            raise SystemExit("strace is not installed")
        with tempfile.NamedTemporaryFile(prefix="strace-", suffix=".txt", dir=args.dir) as out:
            print("under strace -f -c (times not comparable):")
            run(args.quick, args.dir, ["strace", "-f", "-c", "-o", out.name], args.only)
            with contextlib.suppress(OSError):
                print(Path(out.name).read_text())


if __name__ == "__main__":
    main()
