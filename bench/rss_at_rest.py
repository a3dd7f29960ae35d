"""Resident size of the daemon's processes at rest: fresh, then after each kind of registration.

    .venv/bin/python bench/rss_at_rest.py [--cases "small fresh,small fork,2000 probes,20000 probes"]

A private daemon (FUSE mode, state on tmpfs, no debug logging). Its processes' VmRSS
is printed when it has started and after each case of ``bench/profile_registration.py``
(200 registrations of the small cases, 5 of the large ones, each from a fresh forked
client), once every client is pruned and a second has passed. Children start on first
use: the fetch helper with the first FUSE-mode ADDDOF, the large lane's parser with the
first DOF of 64 KiB or more.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_receiver import Bench
from bench.profile_registration import _rss_kib, cases, daemon_roles, fork_register
from tests.support.daemon import DaemonHandle, finish, start_daemon


def show(daemon: DaemonHandle, what: str) -> None:
    total = 0
    parts = []
    for role, pids in daemon_roles(daemon).items():
        kib = sum(_rss_kib(pid) for pid in pids)
        total += kib
        parts.append(f"{role} {kib / 1024:.1f} MiB ({len(pids)})")
    print(f"{what}: " + ", ".join(parts) + f"; all {total / 1024:.1f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="small fresh,small fork,2000 probes,20000 probes")
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    print("command:", shlex.join([sys.executable, *sys.argv]))
    with tempfile.TemporaryDirectory(prefix="rss-", dir=args.dir) as tmp:
        tmp_path = Path(tmp)
        daemon = start_daemon(tmp_path, debug=False)
        try:
            time.sleep(2)  # the start-up catch-up is over
            show(daemon, "started, at rest")
            bench = Bench(daemon.device, tmp_path)
            by_name = {c[0]: c for c in cases(bench, str(daemon.device), tmp_path, True)}
            for name in wanted:
                if name not in by_name:
                    raise SystemExit(f"no case {name!r} (have: {', '.join(by_name)})")
                _, _, register = by_name[name]
                start = getattr(register, "start", None)
                if start is not None:
                    start()
                fork_register(register, 5 if name.split()[0].isdigit() else 200)
                daemon.wait_for("prune", lambda: daemon.stash_pids() == [], 120)
                time.sleep(1)
                show(daemon, f"after {name}, at rest")
        finally:
            finish(daemon)
    print(f"({os.cpu_count()} cpus)")


if __name__ == "__main__":
    main()
