"""Wall time of each stage of a registration on the daemon's side: where a client's ioctl waits.

    .venv/bin/python bench/profile_stages.py [--case "small fresh"] [-n 400] [--writer]

A private daemon (FUSE mode, state on tmpfs, no debug logging) runs under a wrapper
that times the receiver's stages with ``perf_counter_ns`` (no profiler: each stage
costs one clock read more); the clients are those of ``bench/profile_registration.py``
(a fresh forked process per registration). Printed: the median of each stage, the
client's ioctl p50, and with ``--writer`` the stages inside the stash writer too.
Stages nest: ``_run`` (the worker's whole job) holds ``_adddof``, which holds
``fetch`` (whose ``identify`` runs while the fetch helper reads), the parse, the
tracepoint check and ``writer.register``; ``writer.remove_pid`` is the exit prune,
which runs after the client has its answer.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_acc: dict[str, list[int]] = {}
_lock = threading.Lock()


def _timed(owner: Any, name: str, label: str) -> None:
    orig: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return orig(*args, **kwargs)
        finally:
            elapsed = time.perf_counter_ns() - t0
            with _lock:
                _acc.setdefault(label, []).append(elapsed)

    setattr(owner, name, timed)


def _dump_at_exit(path: str) -> None:
    def dump() -> None:
        with open(path, "w") as f:
            json.dump(_acc, f)

    atexit.register(dump)
    real_exit = os._exit

    def _exit(code: int) -> None:  # the children end with os._exit
        dump()
        real_exit(code)

    os._exit = _exit  # type: ignore[assignment]


def as_daemon(argv: list[str]) -> None:
    """Run ``python -m dtprobed ARGS`` with the stages timed (``--as-daemon``)."""
    import dtprobed.children.parser as parser
    import dtprobed.children.writer as writer
    import dtprobed.daemon.identity as identity
    import dtprobed.daemon.receiver as receiver
    import dtprobed.device.fetch as fetch

    for owner, name, label in (
        (receiver.Receiver, "handle", "handle (device thread)"),
        (receiver.Receiver, "_run", "_run (worker, whole job)"),
        (receiver.Receiver, "_adddof", "_adddof"),
        (receiver.Receiver, "_hasusdt", "_hasusdt"),
        (fetch.FetchPool, "fetch", "fetch (identify inside)"),
        (receiver, "identify", "identify"),
        (receiver, "identify_object", "identify_object"),
        (parser.ParserChild, "parse_result", "parse_result"),
        (receiver, "parse_object_notes", "parse_object_notes"),
        (identity.AddressSpace, "check_tracepoints", "check_tracepoints"),
        (writer.StashWriterChild, "register_records", "writer.register"),
        (writer.StashWriterChild, "remove_pid", "writer.remove_pid (exit prune)"),
        (receiver, "_safe_reply", "reply"),
    ):
        _timed(owner, name, label)
    if os.environ.get("STAGES_WRITER_OUT"):
        argv_of = writer.StashWriterChild.argv

        def wrapped_argv(self: writer.StashWriterChild) -> list[str]:
            cmd = argv_of(self)  # [python, -I, -m, dtprobed.stash.writer, ...]
            return [cmd[0], __file__, "--as-writer", "--", *cmd[4:]]

        writer.StashWriterChild.argv = wrapped_argv  # type: ignore[method-assign]
    _dump_at_exit(os.environ["STAGES_OUT"])
    sys.argv = ["dtprobed", *argv[argv.index("dtprobed") + 1 :]]
    runpy.run_module("dtprobed", run_name="__main__", alter_sys=True)


def as_writer(argv: list[str]) -> None:
    """Run the stash writer with its stages timed (``--as-writer``)."""
    import dtprobed.stash.store as store

    for name, label in (
        ("register", "Stash.register"),
        ("check_records", "Stash.check_records"),
        ("remove_pid", "Stash.remove_pid"),
    ):
        _timed(store.Stash, name, label)
    _dump_at_exit(os.environ["STAGES_WRITER_OUT"])
    sys.argv = ["dtprobed.stash.writer", *argv]
    runpy.run_module("dtprobed.stash.writer", run_name="__main__", alter_sys=True)


def _print(path: Path, title: str) -> None:
    stages: dict[str, list[int]] = json.loads(path.read_text())
    print(title)
    for label, values in stages.items():
        print(f"  {label:34s} n={len(values):5d}  p50 {statistics.median(values) / 1e3:8.1f} µs")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--as-daemon":
        as_daemon(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--as-writer":
        as_writer(sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="small fresh", help="a case of profile_registration.py")
    ap.add_argument("-n", type=int, default=400)
    ap.add_argument("--writer", action="store_true", help="time the writer's stages too")
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")

    from bench.bench_receiver import Bench
    from bench.profile_registration import cases, fork_register
    from tests.support.daemon import finish, start_daemon

    with tempfile.TemporaryDirectory(prefix="stages-", dir=args.dir) as tmp:
        tmp_path = Path(tmp)
        os.environ["STAGES_OUT"] = str(tmp_path / "stages.json")
        if args.writer:
            os.environ["STAGES_WRITER_OUT"] = str(tmp_path / "writer-stages.json")
        daemon = start_daemon(
            tmp_path, debug=False, wrap=[sys.executable, __file__, "--as-daemon", "--"]
        )
        try:
            bench = Bench(daemon.device, tmp_path)
            found = [
                c for c in cases(bench, str(daemon.device), tmp_path, True) if c[0] == args.case
            ]
            if not found:
                raise SystemExit(f"no case {args.case!r}")
            _, _, register = found[0]
            start = getattr(register, "start", None)
            if start is not None:
                start()
            fork_register(register, 5)  # warm-up
            times = fork_register(register, args.n)
            daemon.wait_for("prune", lambda: daemon.stash_pids() == [], 60)
        finally:
            finish(daemon)
        print(f"{args.case}: client ioctl p50 {statistics.median(times) * 1e3:.3f} ms, n={args.n}")
        _print(tmp_path / "stages.json", "daemon stages (wall time, median):")
        if args.writer:
            _print(tmp_path / "writer-stages.json", "stash writer stages (wall time, median):")


if __name__ == "__main__":
    main()
