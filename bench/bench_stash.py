"""Cost of a registration (add + write-parsed) in the stash, and syscalls per probe.

    .venv/bin/python bench/bench_stash.py [--runs N] [--dir DIR]

For 3-, 2000- and 20000-probe registrations: the median (and p99) wall time of
``Stash.register`` in-process and of ``StashWriterChild.register`` through the
writer child (frames over pipes, re-check, write), measured side by side in
one run; then the syscalls per probe of an in-process register, counted with
``strace -f -c`` as (syscalls for 20000 probes - syscalls for 3) / 19997.
Each timed registration goes to a fresh pid directory and is removed untimed.
Then, through the writer child, small registrations (3 probes) of another process sent
one after the other while a 20000-probe registration, and then its removal, hold the
writer: their latency (the priority channel answers them between slices).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.grammar import check_stream
from dtprobed.children.writer import StashWriterChild
from dtprobed.oslib.procfs import start_time_of as proc_start_time
from dtprobed.stash.store import Stash
from tests.stash.support import many_records, records_for, registration

SIZES = (3, 2000, 20000)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one_register(state: str, n: int) -> None:
    """Used under strace: one in-process registration of n probes."""
    stash = Stash(state)
    me = os.getpid()
    start = proc_start_time(me) or 0
    stash.register(registration(me, start), many_records(n))


def count_syscalls(base: str, n: int) -> int:
    out = Path(base) / f"strace-{n}.txt"
    state = str(Path(base) / f"strace-state-{n}")
    cmd = [
        "strace",
        "-f",
        "-c",
        "-o",
        str(out),
        sys.executable,
        __file__,
        "--one",
        str(n),
        "--dir",
        state,
    ]
    subprocess.run(cmd, check=True)
    text = out.read_text()
    # "% time  seconds  usecs/call  calls  [errors]  total": calls is the 4th column
    line = next(x for x in text.splitlines() if x.rstrip().endswith(" total"))
    return int(line.split()[3])


def during_long(child: StashWriterChild, pid: int, start: int) -> None:
    """Small registrations of another process while a 20000-probe Register, then its
    RemovePid, hold the writer: (p50, p99, max, n) of each phase."""
    other = subprocess.Popen(["sleep", "3600"])
    try:
        small = registration(other.pid, proc_start_time(other.pid) or 0, ino=2)
        small_records = records_for("small", [("a.out", "main", "p", 0x401000)])
        big = registration(pid, start, ino=1)
        big_records = many_records(20000)
        for phase in ("register", "remove"):
            if phase == "remove":
                child.register_records(big, big_records)
            long_call = (
                (lambda: child.register_records(big, big_records))
                if phase == "register"
                else (lambda: child.remove_pid(pid))
            )
            thread = threading.Thread(target=long_call)
            times: list[float] = []
            thread.start()
            while thread.is_alive():
                t = time.perf_counter()
                child.register_records(small, small_records)
                times.append(time.perf_counter() - t)
                child.remove_pid(other.pid)
            thread.join()
            if phase == "register":
                child.remove_pid(pid)
            print(
                f"3-probe register during a 20000-probe {phase}: n={len(times)}, "
                f"p50 {statistics.median(times) * 1e3:.2f} ms, p99 {_pct(times, 0.99) * 1e3:.2f} ms, "
                f"max {max(times) * 1e3:.2f} ms"
            )
    finally:
        other.kill()
        other.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--one", type=int, default=None)
    args = ap.parse_args()
    if args.one is not None:
        one_register(args.dir, args.one)
        return
    base = tempfile.mkdtemp(dir=args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None))
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"state dir filesystem: {base}")
    sleeper = subprocess.Popen(["sleep", "3600"])
    try:
        pid, start = sleeper.pid, proc_start_time(sleeper.pid) or 0
        stash = Stash(os.path.join(base, "inproc"))
        child = StashWriterChild(os.path.join(base, "child"), timeout=120)
        child.start()
        print(
            f"{'probes':>7} {'in-process med':>15} {'p99':>9} {'writer child med':>17} {'p99':>9} {'ratio':>6} {'µs/probe (child)':>17}"
        )
        for n in SIZES:
            records = many_records(n)
            probes = check_stream(records).probes
            reg = registration(pid, start)
            child.register(reg, probes)  # warm-up (the child's imports, page cache)
            child.remove_pid(pid)
            inproc: list[float] = []
            viachild: list[float] = []
            for _ in range(args.runs):
                t = time.perf_counter()
                stash.register(reg, records)
                inproc.append(time.perf_counter() - t)
                stash.remove_pid(pid)
                t = time.perf_counter()
                child.register(reg, probes)
                viachild.append(time.perf_counter() - t)
                child.remove_pid(pid)
            mi, mc = statistics.median(inproc), statistics.median(viachild)
            print(
                f"{n:>7} {mi * 1e3:>12.2f} ms {_pct(inproc, 0.99) * 1e3:>6.2f} ms "
                f"{mc * 1e3:>14.2f} ms {_pct(viachild, 0.99) * 1e3:>6.2f} ms {mc / mi:>6.2f} {mc / n * 1e6:>17.1f}"
            )
        during_long(child, pid, start)
        child.stop()
        stash.close()
        if shutil.which("strace"):
            lo, hi = count_syscalls(base, 3), count_syscalls(base, 20000)
            print(f"syscalls (strace -f -c, whole process): 3 probes {lo}, 20000 probes {hi}")
            print(f"syscalls per probe: {(hi - lo) / (20000 - 3):.2f}")
        else:
            print(
                "strace not installed: syscalls per probe not measured (apt-get install -y strace)"
            )
    finally:
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
