"""How long a dlclose()d library's probes stay in FUSE mode, and what the check costs.

In FUSE mode the library destructor's REMOVE never reaches the daemon; the
periodic prune (``--prune-interval``) drops a generation once its object is
no longer mapped (``dtprobed/daemon/unmapped.py``).  Measures, with a private
FUSE-mode daemon (state dir on tmpfs, no debug logging) and real programs
built by ``tests/support/sunw_dof.py`` (a PIE with probes that dlopens a
library with probes):

1. the **delay**: from the program's ``dlclose`` returning to the library's
   ``$gen`` symlink being gone, per prune interval given (default 2 and 60 s,
   the shipped default); expected: spread over [0, interval] plus the cost of
   one prune, so the median is about half the interval and the maximum below
   the interval plus that cost;
2. the **cost** of one unmapped-objects pass (:func:`drop_unmapped`, run in
   this process on the daemon's state directory, read-only: nothing is
   unmapped) over N registered processes with two objects each, side by side
   with an empty stash in the same run.

Usage: ``.venv/bin/python bench/bench_unmapped.py [--intervals 2,60] [--samples N]
[--procs N]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtprobed.daemon.unmapped import drop_unmapped
from tests.support import sunw_dof as sd
from tests.support.daemon import finish, start_daemon
from tests.support.stash_view import generations

MAIN = (sd.SunwProvider("benchmain", (sd.SunwProbe("tick", ("int",)),)),)
LIB = (sd.SunwProvider("benchlib", (sd.SunwProbe("call", ("int",)),)),)


class _NoRemove:
    """Stands for the writer in the cost pass: nothing may be unmapped there."""

    def remove(self, pid: int, gen: int) -> bool:
        raise AssertionError(f"{pid}: generation {gen} found unmapped in the cost pass")


def _wait(what: str, predicate: object, timeout: float) -> float:
    """Poll every 5 ms; the monotonic time at which *predicate* became true."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if predicate():  # type: ignore[operator]
            return now
        if now > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def measure_delay(
    tmp: Path, pie: sd.BuiltObject, lib: sd.BuiltObject, interval: float, samples: int
) -> list[float]:
    handle = start_daemon(
        tmp, extra_args=["--prune-interval", f"{interval:g}"], debug=False, name=f"d{interval:g}"
    )
    delays: list[float] = []
    rng = random.Random(interval)
    try:
        prog = sd.SunwProgram.start(pie.path, devname=handle.device, debug=False)
        try:
            for i in range(samples):
                assert prog.command(f"o {lib.path}") == f"o {lib.path}"
                gen = int(prog.info("li")["gen"])
                assert gen in generations(handle.state_dir, prog.pid), (i, gen)
                # a random phase: right after a drop the next prune is a whole interval away
                time.sleep(rng.uniform(0, interval))
                prog.command("c")
                closed = time.monotonic()
                gone = _wait(
                    "the library's generation to go",
                    lambda gen=gen: gen not in generations(handle.state_dir, prog.pid),
                    interval * 3 + 30,
                )
                delays.append(gone - closed)
        finally:
            prog.quit()
    finally:
        finish(handle)
    return delays


def measure_cost(
    tmp: Path, pie: sd.BuiltObject, lib: sd.BuiltObject, procs: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Per-pass seconds over an empty stash and over *procs* processes (2 objects each)."""
    handle = start_daemon(tmp, extra_args=["--prune-interval", "3600"], debug=False, name="cost")
    running: list[sd.SunwProgram] = []
    try:
        state = str(handle.state_dir)
        empty = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            drop_unmapped(state, _NoRemove())
            empty.append(time.perf_counter() - t0)
        for _ in range(procs):
            prog = sd.SunwProgram.start(pie.path, devname=handle.device, debug=False)
            running.append(prog)
            prog.command(f"o {lib.path}")
        assert len(handle.stash_pids()) == procs
        full = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            drop_unmapped(state, _NoRemove())
            full.append(time.perf_counter() - t0)
    finally:
        for prog in running:
            prog.quit()
        finish(handle)
    return empty, full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals", default="2,60", help="prune intervals to measure (s)")
    ap.add_argument("--samples", type=int, default=10, help="dlcloses per interval")
    ap.add_argument("--samples-long", type=int, default=5, help="… for intervals ≥ 30 s")
    ap.add_argument("--procs", type=int, default=200, help="registered processes, cost pass")
    ap.add_argument("--rounds", type=int, default=9, help="cost passes per stash")
    args = ap.parse_args()
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    pie = sd.build_sunw_object(MAIN, kind="pie", name="benchunmappie")
    lib = sd.build_sunw_object(LIB, kind="lib", name="libbenchunmap.so")
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-unmapped.", dir="/dev/shm") as tmpdir:
        tmp = Path(tmpdir)
        for text in args.intervals.split(","):
            interval = float(text)
            n = args.samples_long if interval >= 30 else args.samples
            delays = measure_delay(tmp, pie, lib, interval, n)
            report[f"delay_{interval:g}s"] = delays
            print(
                f"prune interval {interval:g} s, {n} dlcloses: delay median "
                f"{statistics.median(delays):.2f} s, min {min(delays):.2f} s, "
                f"max {max(delays):.2f} s (max/interval {max(delays) / interval:.2f})"
            )
        empty, full = measure_cost(tmp, pie, lib, args.procs, args.rounds)
        report["cost_empty"] = empty
        report["cost_full"] = full
        med_e, med_f = statistics.median(empty), statistics.median(full)
        print(
            f"one unmapped-objects pass, median of {args.rounds}: empty stash "
            f"{med_e * 1e3:.2f} ms; {args.procs} processes × 2 objects {med_f * 1e3:.1f} ms "
            f"({med_f / args.procs * 1e6:.0f} µs per process, ratio {med_f / med_e:.0f}×)"
        )
    print("json:", json.dumps(report))


if __name__ == "__main__":
    main()
