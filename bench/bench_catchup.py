"""What a catch-up scan costs: 1000 processes with 10 mapped objects each, and the p99 of
small registrations while a scan runs, side by side with none running.

Runs a private FUSE-mode daemon (state dir on tmpfs, no debug logging) and N small C
processes (``mapper``), each mapping, besides its own executable, libc and ld.so, 7
more executable objects: shared objects without probes drawn from a pool of P distinct
files (copies of one tiny ``.so``: distinct inodes, so each is located on its own), and,
in one process of every ten, ``libfx.so`` (a ``.note.usdt`` object built by the real
dtrace 2.0.7, from ``tests/parser/fixtures/notes``) in place of one of them: the
objects with probes catch-up registers.  Every mapper names the private helper in
``DTRACE_DOF_INIT_DEVNAME``, so every one is scanned in full (as every process is on a
machine whose daemon serves the default helper); the machine's other processes name
another helper and are skipped after reading their environment.

Measures:

1. the start-up scan (daemon started after the mappers; it registers the N/10 notes
   objects) and warm scans (SIGHUP; everything registered already: the steady state),
   from the daemon's own summary line ``catch-up: … (X s)``; target ≤ 1 s;
2. client-observed ``ioctl(ADDDOF)`` wall time of small (3-probe) registrations, each
   from a fresh forked process (``bench/bench_receiver.py``'s ``Bench``), one at a time,
   during warm scans and, alternating with them, while no scan runs: p50 and p99.

Usage: ``.venv/bin/python bench/bench_catchup.py [--procs 1000] [--pool 200]
[--scans 5]``
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_receiver import Bench, ms, pct, small_dof
from common.errors import RequestRejected
from tests.support.daemon import DaemonHandle, finish, start_daemon

REPO = Path(__file__).resolve().parents[1]
NOTES_OBJECT = REPO / "tests" / "parser" / "fixtures" / "notes" / "libfx.so"
OBJECTS_PER_PROCESS = 10
OWN_OBJECTS = 3  # the mapper, libc, ld.so

MAPPER_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* mapper READY_FD FILE...: map each FILE whole, PROT_READ|PROT_EXEC; say "r"; sleep. */
int main(int argc, char **argv)
{
	int ready = atoi(argv[1]);

	for (int i = 2; i < argc; i++) {
		struct stat st;
		int fd = open(argv[i], O_RDONLY | O_CLOEXEC);

		if (fd < 0 || fstat(fd, &st) < 0)
			return 1;
		if (mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED)
			return 1;
		close(fd);
	}
	if (write(ready, "r", 1) != 1)
		return 1;
	close(ready);
	for (;;)
		pause();
}
"""
POOL_C = "int pool_object(int x) { return x + 1; }\n"
LINE = re.compile(r"^(\S+ \d\d:\d\d:\d\d,\d{3}) dtprobed\[\d+\] INFO: (.*)$")
SUMMARY = re.compile(r"catch-up: (\d+) processes scanned, (\d+) objects registered")


def build(work: Path, pool: int) -> tuple[Path, list[Path]]:
    (work / "mapper.c").write_text(MAPPER_C)
    (work / "pool.c").write_text(POOL_C)
    mapper = work / "mapper"
    subprocess.run(["gcc", "-O1", "-o", str(mapper), str(work / "mapper.c")], check=True)
    lib = work / "libpool.so"
    subprocess.run(
        ["gcc", "-O1", "-shared", "-fPIC", "-o", str(lib), str(work / "pool.c")], check=True
    )
    objects = work / "objects"
    objects.mkdir()
    copies = []
    for i in range(pool):
        copy = objects / f"libpool{i:04d}.so"
        shutil.copyfile(lib, copy)
        copies.append(copy)
    notes = objects / "libfx.so"
    shutil.copyfile(NOTES_OBJECT, notes)
    return mapper, [notes, *copies]


def start_mappers(
    mapper: Path, objects: list[Path], procs: int, helper: Path
) -> list[subprocess.Popen[bytes]]:
    rng = random.Random(1)
    notes, pool = objects[0], objects[1:]
    extra = OBJECTS_PER_PROCESS - OWN_OBJECTS
    env = {"PATH": "/usr/bin:/bin", "DTRACE_DOF_INIT_DEVNAME": str(helper)}
    ready_r, ready_w = os.pipe()
    running: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(procs):
            files = rng.sample(pool, extra)
            if i % 10 == 0:
                files[0] = notes
            running.append(
                subprocess.Popen(
                    [str(mapper), str(ready_w), *map(str, files)],
                    pass_fds=[ready_w],
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            )
        os.close(ready_w)
        ready_w = -1
        got = 0
        while got < procs:
            chunk = os.read(ready_r, procs - got)
            if not chunk:
                raise RuntimeError(f"only {got} of {procs} mappers started")
            got += len(chunk)
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    return running


def _stamp(text: str) -> float:
    clock = text.partition(" ")[2]
    hms, _, millis = clock.partition(",")
    h, m, sec = (int(x) for x in hms.split(":"))
    return h * 3600 + m * 60 + sec + int(millis) / 1000


def scans(handle: DaemonHandle) -> list[tuple[int, int, float]]:
    """(processes, registered, seconds) of every catch-up so far: the seconds from the
    timestamps (ms) of its "scanning" and summary lines in the daemon's log."""
    out: list[tuple[int, int, float]] = []
    began = None
    for line in handle.log_text().splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        if m[2].startswith("catch-up: scanning "):
            began = _stamp(m[1])
        elif began is not None and (summary := SUMMARY.match(m[2])):
            out.append((int(summary[1]), int(summary[2]), _stamp(m[1]) - began))
            began = None
    return out


def _scan_running(handle: DaemonHandle, before: int) -> Callable[[], bool]:
    return lambda: len(scans(handle)) == before


def registrations_while(bench: Bench, helper: bytearray, busy: Callable[[], bool]) -> list[float]:
    """Register one at a time from fresh processes until ``busy()`` is false (≥ 1)."""
    out: list[float] = []
    while True:
        for elapsed, result, _pid in bench.in_children(helper, 1, 1):
            assert result >= 0, f"registration failed: {result}"
            out.append(elapsed)
        if not busy():
            return out


class _NoProbes:
    """The profiled scan's registrar: every object it is asked to locate has no probes (the
    parser's answer is left out of the profile: it is another process), nothing else may
    be asked for (the objects with probes are registered already)."""

    def __init__(self) -> None:
        self.located = 0

    def catch_up_locate(self, *_args: object) -> object:
        self.located += 1
        raise RequestRejected(errno.EINVAL, "no .note.usdt or .SUNW_dof (profiled scan)")

    def __getattr__(self, name: str) -> Callable[..., object]:
        raise AssertionError(f"the warm scan called the registrar's {name}")


def profile_scan(handle: DaemonHandle) -> None:
    """One warm scan in this process under cProfile (the daemon's own is the same code)."""
    import cProfile
    import pstats

    from dtprobed.daemon.catchup import CatchUp

    registrar = _NoProbes()
    scan = CatchUp(
        registrar,  # type: ignore[arg-type]
        remover=registrar,  # type: ignore[arg-type]
        device=str(handle.device),
        state_dir=str(handle.state_dir),
        max_dof_size=1 << 20,
    )
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    summary = scan.run()
    prof.disable()
    wall = time.perf_counter() - t0
    print(
        f"profiled warm scan (in this process, the parser's locate answers left out: "
        f"{registrar.located} objects asked for): {summary.line()}: {wall:.3f} s (profiled)"
    )
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=1000)
    ap.add_argument("--pool", type=int, default=200, help="distinct objects without probes")
    ap.add_argument("--scans", type=int, default=5, help="warm scans (each with registrations)")
    ap.add_argument("--dir", default="/dev/shm", help="state dir's parent (tmpfs, like /run)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile one warm scan, run in this process (cProfile, top functions)",
    )
    args = ap.parse_args()
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-catchup.", dir=args.dir) as tmpdir:
        work = Path(tmpdir)
        mapper, objects = build(work, args.pool)
        helper_path = work / "helper"
        helper_path.write_bytes(b"")
        mappers = start_mappers(mapper, objects, args.procs, helper_path)
        handle: DaemonHandle | None = None
        try:
            t0 = time.monotonic()
            handle = start_daemon(work, device=helper_path, debug=False)
            handle.wait_for("the start-up catch-up", lambda: len(scans(handle)) >= 1, 600)
            first = scans(handle)[0]
            print(
                f"start-up scan: {first[0]} processes ({args.procs} mappers × "
                f"{OBJECTS_PER_PROCESS} objects, {len(objects)} distinct files), "
                f"{first[1]} objects registered: {first[2]:.3f} s "
                f"(daemon start to summary {time.monotonic() - t0:.2f} s)"
            )
            report["startup_scan"] = first
            bench = Bench(handle.device, work)
            helper = bench.mapped_helper(small_dof())
            idle: list[float] = []
            during: list[float] = []
            warm: list[tuple[int, int, float]] = []
            for _ in range(args.scans):
                # no scan: as many registrations as the last scan saw, at least 50
                target = max(50, len(during) // max(1, len(warm)))
                idle += [e for e, _r, _p in bench.in_children(helper, target, 1)]
                before = len(scans(handle))
                os.kill(handle.pid, signal.SIGHUP)
                during += registrations_while(bench, helper, _scan_running(handle, before))
                warm.append(scans(handle)[before])
            secs = [s for _p, _r, s in warm]
            print(
                f"warm scans (SIGHUP, everything registered), {len(warm)}: median "
                f"{statistics.median(secs):.3f} s, max {max(secs):.3f} s; "
                f"{warm[-1][0]} processes, {sum(r for _p, r, _s in warm)} objects registered"
            )
            print(
                f"small registrations, no scan: {len(idle)}, p50 {ms(pct(idle, 0.5))}, "
                f"p99 {ms(pct(idle, 0.99))}; during scans: {len(during)}, "
                f"p50 {ms(pct(during, 0.5))}, p99 {ms(pct(during, 0.99))} "
                f"(p99 ratio {pct(during, 0.99) / pct(idle, 0.99):.2f})"
            )
            report.update(warm_scans=warm, idle=idle, during=during)
            handle.verify()
            if args.profile:
                profile_scan(handle)
        except BaseException:
            if handle is not None:
                handle.cleanup_hard()
            raise
        finally:
            for proc in mappers:
                proc.kill()
            for proc in mappers:
                proc.wait()
        assert handle is not None
        finish(handle)
    print("json:", json.dumps(report))


if __name__ == "__main__":
    main()
