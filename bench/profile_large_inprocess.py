"""Each stage of a large registration's path, run in one process: where its CPU goes.

    .venv/bin/python bench/profile_large_inprocess.py [--probes 20000] [--runs 5] [--dir /dev/shm]

The DOF is ``bench/bench_receiver.py``'s (one function per probe, 3 argument types),
and every stage is the code the three processes run, called in-process one after
the other, with no pipes or hand-offs between them:

1. the parser's ``parse_dof``;
2. the parser child's encoding of the answer into record-batch frames;
3. the daemon's decoding of those frames and its record checks (``_Checked``);
4. the daemon's record stream for the writer, 5. its ``Register`` frame;
6. the writer's decoding of that frame, 7. its record check (``Stash.check_records``);
8. ``Stash.register_probes`` into a state directory on tmpfs, 9. ``Stash.remove_pid``.

Printed: the median of each stage over the runs. Objects of one run are freed before
the next, so the cyclic GC's share is what each process pays for its own records.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_receiver import HUGE_BASE, many_dof  # noqa: E402

from common.dof_build import build_helper  # noqa: E402
from common.framing import FrameDecoder, FrameEncoder  # noqa: E402
from common.limits import ParseLimits  # noqa: E402
from common.records import ParserRecord  # noqa: E402
from common.stash_protocol import MAX_COMMAND_FRAME, Register, StashCommand  # noqa: E402
from dtprobed.children.parser import _Checked, _no_log  # noqa: E402
from dtprobed.children.writer import probes_to_records  # noqa: E402
from dtprobed.oslib.procfs import start_time_of  # noqa: E402
from dtprobed.stash.store import Stash  # noqa: E402
from parserd.child import ChildLoop  # noqa: E402
from parserd.dof_parse import parse_dof  # noqa: E402
from tests.stash.support import registration  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    dof = many_dof(args.probes, 3, HUGE_BASE)
    helper = build_helper(b"a.out", 0, 0x10000)
    limits = ParseLimits()
    loop = ChildLoop(limits)
    batches: FrameDecoder[list[ParserRecord]] = FrameDecoder(list[ParserRecord], 1 << 20)
    commands: FrameDecoder[StashCommand] = FrameDecoder(StashCommand, MAX_COMMAND_FRAME)
    encoder = FrameEncoder()
    base = tempfile.mkdtemp(dir=args.dir)
    sleeper = subprocess.Popen(["sleep", "3600"])
    times: dict[str, list[float]] = {}

    def timed(label: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        result = fn(*args)
        times.setdefault(label, []).append(time.perf_counter() - t0)
        return result

    try:
        stash = Stash(os.path.join(base, "state"))
        reg = registration(sleeper.pid, start_time_of(sleeper.pid) or 0)

        def daemon_checks(frames: bytes) -> _Checked:
            checked = _Checked(limits)
            for batch in batches.split(frames)[0]:
                checked.feed_batch(batch, _no_log)
            return checked

        for _ in range(args.runs):
            records = timed("1 parse (parse_dof)", parse_dof, helper, dof, limits)
            frames = timed("2 parser: encode the answer", loop.encode_answer, records)
            checked = timed("3 daemon: decode + check", daemon_checks, frames)
            stream = timed("4 daemon: records for the writer", probes_to_records, checked.probes)
            command = Register(reg=reg, records=stream)
            frame = timed("5 daemon: encode Register", encoder.encode, command)
            cmd = timed("6 writer: decode Register", lambda data: commands.split(data)[0][0], frame)
            probes = timed("7 writer: check_records", stash.check_records, cmd.records, "add")
            timed("8 writer: register_probes", stash.register_probes, cmd.reg, probes)
            timed("9 writer: remove_pid (exit)", stash.remove_pid, sleeper.pid)
            del records, frames, checked, stream, command, frame, cmd, probes
        stash.close()
    finally:
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(base, ignore_errors=True)
    total = 0.0
    print(f"{args.probes} probes, median of {args.runs} runs:")
    for label, values in times.items():
        median = statistics.median(values) * 1e3
        if not label.startswith("9"):
            total += median
        print(f"  {label:36s} {median:8.1f} ms")
    print(f"  {'stages 1-8 together':36s} {total:8.1f} ms")


if __name__ == "__main__":
    main()
