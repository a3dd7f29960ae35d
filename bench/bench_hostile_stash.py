"""Full-size figures for the hostile-stash rows of docs/security.md (the tests scale down).

    .venv/bin/python bench/bench_hostile_stash.py [--runs N] [--dir DIR] [--skip-startup]

1. **Huge commits**: 65536-probe registrations (the per-process maximum) through
   the writer child with ``-t 5``: wall time of each commit (median, max), and
   the longest silence between two frames the host saw (what ``-t`` bounds).
2. **Start-up at the default quotas' maximum**: 2^20 probes (16 live processes ×
   65536, four uids × 262144 = the per-uid maximum), written in-process with
   the Stash class on tmpfs; then the writer child's start-up (recovery + index
   rebuild, until ``Started``) as after a crash with one process's ``probes/``
   links gone, and the first ``PruneDead``: median of *runs*, longest silence.
3. **Memory**: the writer's VmRSS at rest, right after, and one command after
   a 65 KB DOF of 610 probes × 255 argument types of 127 bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

import common.dof_build as dof_build
from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper
from common.records import ResultRecord
from dtprobed.children.writer import StashWriterChild
from dtprobed.oslib.procfs import start_time_of
from dtprobed.stash.store import Stash
from tests.stash.support import WORKED, many_records, registration


class Gaps:
    """Longest time between two frames (on_progress calls) of one exchange."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.longest = 0.0

    def reset(self) -> None:
        self.last = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        self.longest = max(self.longest, now - self.last)
        self.last = now


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def sleepers(n: int) -> list[subprocess.Popen[bytes]]:
    procs = [subprocess.Popen(["sleep", "3600"]) for _ in range(n)]
    time.sleep(0.2)
    return procs


def huge_commits(base: str, runs: int) -> None:
    gaps = Gaps()
    writer = StashWriterChild(os.path.join(base, "huge"), timeout=5, on_progress=gaps)
    writer.start()
    procs = sleepers(runs)
    records = many_records(65536)
    times = []
    try:
        for p in procs:
            reg = registration(p.pid, start_time_of(p.pid) or 0)
            gaps.reset()
            t = time.perf_counter()
            writer.register_records(reg, records)
            times.append(time.perf_counter() - t)
        print(
            f"65536-probe commit (-t 5), {runs} runs: median {statistics.median(times):.2f} s, "
            f"max {max(times):.2f} s; longest silence {gaps.longest:.2f} s"
        )
        removal = []
        for p in procs:
            t = time.perf_counter()
            writer.remove_pid(p.pid)
            removal.append(time.perf_counter() - t)
        print(f"its removal: median {statistics.median(removal):.2f} s")
    finally:
        writer.stop()
        for p in procs:
            p.kill()
            p.wait()


def full_stash_startup(base: str, runs: int) -> None:
    state = Path(base) / "full"
    procs = sleepers(16)
    try:
        t = time.perf_counter()
        stash = Stash(str(state))
        for i, p in enumerate(procs):
            reg = msgspec.structs.replace(
                registration(p.pid, start_time_of(p.pid) or 0), uid=1000 + i // 4
            )
            stash.register(reg, many_records(65536, f"s{i}"))
        usage = stash.usage
        stash.close()
        used = subprocess.run(["du", "-sm", str(state)], capture_output=True, text=True).stdout
        apparent = subprocess.run(
            ["du", "-sm", "--apparent-size", str(state)], capture_output=True, text=True
        ).stdout
        print(
            f"built {usage.probes} probes of {len(procs)} processes in-process in "
            f"{time.perf_counter() - t:.0f} s; on tmpfs {used.split()[0]} MB used "
            f"(a page per probe file), {apparent.split()[0]} MB apparent"
        )
        starts, prunes, silences = [], [], []
        for run in range(runs):
            shutil.rmtree(
                state / "probes" / str(procs[run % len(procs)].pid)
            )  # a crash's leftovers
            gaps = Gaps()
            writer = StashWriterChild(str(state), timeout=5, on_progress=gaps)
            t = time.perf_counter()
            writer.start()
            starts.append(time.perf_counter() - t)
            silences.append(gaps.longest)
            assert writer.started is not None and writer.started.probes == 1 << 20
            t = time.perf_counter()
            assert writer.prune_dead() == []
            prunes.append(time.perf_counter() - t)
            writer.stop()
        print(
            f"writer start-up on it (recovery relinking 65536 entries + index), {runs} runs: "
            f"median {statistics.median(starts):.1f} s, max {max(starts):.1f} s; "
            f"longest silence {max(silences):.2f} s; first PruneDead median "
            f"{statistics.median(prunes):.1f} s"
        )
    finally:
        for p in procs:
            p.kill()
            p.wait()


def memory(base: str) -> None:
    from parserd.dof_parse import parse_dof

    original = dof_build._StrTab.add_run
    runs: dict[tuple[str, ...], int] = {}

    def add_run(self: dof_build._StrTab, strings: list[bytes]) -> int:
        key = tuple(s.decode() for s in strings)
        if key not in runs:
            runs[key] = original(self, strings)
        return runs[key]

    dof_build._StrTab.add_run = add_run  # type: ignore[method-assign]
    types: list[str | bytes] = [f"t{j:03d}" + "x" * 123 for j in range(255)]
    probes = [ProbeSpec(f"f{i}", f"p{i}", [0x10], addr=0x1000, native=types) for i in range(610)]
    dof = build_dof([ProviderSpec("mem", probes)]).data
    dof_build._StrTab.add_run = original  # type: ignore[method-assign]
    helper = build_helper(b"a.out", 0, 0)
    records: list[ResultRecord] = list(parse_dof(helper, dof))
    writer = StashWriterChild(os.path.join(base, "mem"), timeout=30)
    writer.start()
    (p,) = sleepers(1)
    try:
        start = start_time_of(p.pid) or 0
        writer.register_records(registration(p.pid, start, ino=1), WORKED)
        assert writer.pid is not None
        rest = rss_kib(writer.pid)
        writer.register_records(registration(p.pid, start, ino=2, dof=dof), records)
        right_after = rss_kib(writer.pid)
        writer.remove(p.pid, 1)
        after = rss_kib(writer.pid)
        print(
            f"writer VmRSS, hostile {len(dof)}-byte DOF ({len(records)} records): rest "
            f"{rest / 1024:.1f} MiB, right after {right_after / 1024:.1f} MiB, one command "
            f"later {after / 1024:.1f} MiB (+{(after - rest) / 1024:.1f} MiB)"
        )
    finally:
        writer.stop()
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--skip-startup", action="store_true")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="bench-hostile-", dir=args.dir)
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"state dirs under {base}; {os.cpu_count()} CPUs")
    try:
        huge_commits(base, args.runs)
        memory(base)
        if not args.skip_startup:
            full_stash_startup(base, args.runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
