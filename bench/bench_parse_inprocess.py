"""In-process cost of ``parserd.dof_parse.parse_dof``: per probe and MiB/s.

Parses DOF built like ``dtrace -G`` output (``common.dof_build.many_probes_dof``:
one tracepoint and three native argument types per probe) with 3, 2000 and
20000 probes, plus the 2000-probe DOF with one SETX relocation per probe, and
prints the median (and min) of N runs.  The cost through the sandboxed child
is measured by bench/bench_parse_child.py.

    python bench/bench_parse_inprocess.py [--runs N]
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
import time

from common.dof_build import build_helper, many_probes_dof
from common.records import Err
from parserd.dof_parse import parse_dof


def measure(helper: bytes, data: bytes, runs: int) -> list[float]:
    records = parse_dof(helper, data)  # warm up, and check it is accepted
    if isinstance(records[0], Err):
        raise SystemExit(f"benchmark DOF rejected: {records[0].message}")
    times = []
    for _ in range(runs):
        gc.collect()  # each run starts from the same heap state
        start = time.perf_counter()
        parse_dof(helper, data)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="runs per case (default 21)")
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"python {sys.version.split()[0]}; median and min of {args.runs} runs; load {load}")
    print(f"{'case':<22}{'bytes':>10}{'median ms':>11}{'min ms':>9}{'us/probe':>10}{'MiB/s':>8}")
    cases = [
        ("3 probes", 3, False),
        ("2000 probes", 2000, False),
        ("2000 probes, relocs", 2000, True),
        ("20000 probes", 20000, False),
    ]
    helper = build_helper(b"bench", addr=0x400000)
    for name, nprobes, relocate in cases:
        data = many_probes_dof(nprobes, relocate=relocate).data
        runs = args.runs if nprobes < 20000 else max(5, args.runs // 3)
        times = measure(helper, data, runs)
        median = statistics.median(times)
        print(
            f"{name:<22}{len(data):>10}{median * 1e3:>11.3f}{min(times) * 1e3:>9.3f}"
            f"{median / nprobes * 1e6:>10.2f}{len(data) / median / 2**20:>8.1f}"
        )


if __name__ == "__main__":
    main()
