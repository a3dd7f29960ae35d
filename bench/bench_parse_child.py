"""Parse cost of 3-, 2000- and 20000-probe DOF: in-process parse_dof vs the sandboxed child.

    .venv/bin/python bench/bench_parse_child.py [--runs N]

For each size, interleaved in one run: ``parse_dof`` in this process, and a
full ``ParserChild.parse`` exchange with a live sandboxed child (request frame
out, record batches back, schema + grammar checks, ParsedProbe list).  Prints
medians and p99 per request, µs per probe, MiB/s of DOF, and the child/in-process
ratio.  Target (issue 2): 2000 probes under 10 ms through the child.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common.dof_build import build_helper, many_probes_dof
from common.limits import ParseLimits
from dtprobed.children.parser import ParserChild
from parserd.dof_parse import parse_dof


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=0, help="runs per size (default: by size)")
    args = p.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    helper = build_helper()
    child = ParserChild(limits=ParseLimits(), timeout=60)
    child.start()
    try:
        print(f"{'probes':>7} {'KiB':>7} | {'in-proc ms':>10} {'p99':>7} {'MiB/s':>7} | "
              f"{'child ms':>9} {'p99':>7} {'MiB/s':>7} {'us/probe':>8} | {'ratio':>5}")  # fmt: skip
        for nprobes in (3, 2000, 20000):
            dof = many_probes_dof(nprobes).data
            runs = args.runs or {3: 2000, 2000: 200, 20000: 30}[nprobes]
            child.parse(helper, dof)  # warm
            inproc: list[float] = []
            through: list[float] = []
            for _ in range(runs):
                t0 = time.perf_counter()
                parse_dof(helper, dof)
                t1 = time.perf_counter()
                probes = child.parse(helper, dof)
                t2 = time.perf_counter()
                inproc.append(t1 - t0)
                through.append(t2 - t1)
            assert len(probes) == nprobes
            mi, mc = statistics.median(inproc), statistics.median(through)
            mib = len(dof) / (1 << 20)
            print(f"{nprobes:7d} {len(dof) / 1024:7.1f} | {mi * 1e3:10.3f} {_p99(inproc) * 1e3:7.3f} "
                  f"{mib / mi:7.1f} | {mc * 1e3:9.3f} {_p99(through) * 1e3:7.3f} {mib / mc:7.1f} "
                  f"{mc * 1e6 / nprobes:8.2f} | {mc / mi:5.2f}")  # fmt: skip
    finally:
        child.stop()


if __name__ == "__main__":
    main()
