"""Canary registrations under each hostile-user attack, at full size, beside no attack.

    .venv/bin/python bench/bench_attack.py [--canaries N] [--only NAME ...] [--quick]

For every attack of docs/security.md's table that runs on one machine, one run
starts a private daemon (default options unless the attack says otherwise, state
directory on tmpfs as in production), times N registrations of a 3-probe DOF by a
root client with **no attack**, then starts the attack (real hostile processes,
uid 65534 where a uid matters) and times N more while it runs: p50, p99 and max,
the ratio of the medians, failures (must be 0), and the daemon's peak RSS
(VmHWM) above its rest size.  The tests (tests/integration/test_hostile_*.py)
assert the same properties with small limits; timing lives here only.

Attacks (``--only`` names):

* ``flock`` — ``flock(LOCK_SH)`` held on the state directory by another user;
* ``stuck-fuse`` — DOF in a file of a FUSE file system whose READ never completes
  (tests/device/stuck_fuse.py), sent in a loop;
* ``claims`` — 8 processes sending header-only claims of 256 MiB in a loop;
* ``huge-commits`` — 5 processes registering valid 65536-probe DOF at once, again;
* ``slow-parse`` — a valid DOF that parses for ~1 s (65536 probes × 4 tracepoints ×
  10 argument types), sent in a loop by another user, with ``-t 0.4`` (a valid DOF
  cannot take ``-t``'s default 5 s: the parser is fast; see the test);
* ``large-dof`` — 6 concurrent valid 256 MiB DOF (padded; above the 64 MiB raw-byte
  quota per process, so each is fetched, parsed and refused at commit), again and again;
* ``arg-bomb`` — the 65 KB DOF of 610 probes × 255 argument types of 127 bytes,
  registered in a loop by fresh processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.test_hostile_fetch import HOSTILE, stuck_fuse
from tests.integration.test_hostile_memory import _argument_bomb
from tests.integration.test_hostile_parse import LOOP, slow_dof
from tests.integration.test_hostile_stash import ForeignClients, probes_dof
from tests.realkernel.harness import padded_dof
from tests.support.clients import ClientHandle, Clients, code_dof, write_dof, write_plain_dof
from tests.support.daemon import REPO, DaemonHandle, finish, start_daemon

MIB = 1 << 20
#: Registrations per canary process before a fresh one (max 1024 generations each).
PER_CANARY = 200


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class Canary:
    """Root registrations of the 3-probe DOF, timed around the client's ioctl round trip."""

    def __init__(self, clients: Clients, dof: Path) -> None:
        self.clients = clients
        self.dof = dof
        self.client: ClientHandle | None = None
        self.used = 0

    def run(self, n: int) -> tuple[list[float], int]:
        times: list[float] = []
        failed = 0
        for _ in range(n):
            if self.client is None or self.used >= PER_CANARY:
                if self.client is not None:
                    self.client.exit()
                self.client, self.used = self.clients.start(), 0
            t0 = time.perf_counter()
            answer = self.client.register(self.dof)
            times.append(time.perf_counter() - t0)
            self.used += 1
            failed += "gen" not in answer
        return times, failed


@contextlib.contextmanager
def _loop_procs(argvs: list[list[str]]) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, text=True, cwd=REPO) for a in argvs]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _ready_then_drain(procs: list[subprocess.Popen[str]]) -> None:
    """Wait for each process's first (ready) line, then keep reading what it prints
    (a loop's final report must never block it on a full pipe)."""
    for proc in procs:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["ready"]
        threading.Thread(target=proc.stdout.read, daemon=True).start()


# --- the attacks: each a context manager running while the canaries register ---------


@contextlib.contextmanager
def attack_flock(daemon: DaemonHandle, work: Path) -> Iterator[str]:
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
        "os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
        "fcntl.flock(fd, fcntl.LOCK_SH); print('locked', flush=True); time.sleep(3600)\n"
    )
    with _loop_procs([[sys.executable, "-c", code, str(daemon.state_dir)]]) as (proc,):
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield "LOCK_SH held on the state directory by uid 65534"


@contextlib.contextmanager
def attack_stuck_fuse(daemon: DaemonHandle, work: Path) -> Iterator[str]:
    with stuck_fuse(work / "stuck") as server:
        argv = [
            sys.executable, "-c", HOSTILE, str(REPO), str(daemon.device), str(work / "stuck"),
            str(1 << 20), "100000000",
        ]  # fmt: skip
        with _loop_procs([argv]) as procs:
            _ready_then_drain(procs)
            assert server.stdout is not None and "read" in server.stdout.readline()
            threading.Thread(target=server.stdout.read, daemon=True).start()
            yield "uid 65534 sending DOF on a FUSE file whose READ never completes, in a loop"


@contextlib.contextmanager
def attack_claims(daemon: DaemonHandle, work: Path) -> Iterator[str]:
    header = bytearray(code_dof().data[:64])
    header[40:48] = (256 * MIB).to_bytes(8, "little")  # dofh_loadsz
    claim = work / "claim.dof"
    claim.write_bytes(bytes(header) + bytes(4096 - 64))
    argv = [sys.executable, "-c", HOSTILE, str(REPO), str(daemon.device), str(claim), "4096",
            "100000000"]  # fmt: skip
    with _loop_procs([argv] * 8) as procs:
        _ready_then_drain(procs)
        yield "8 processes of uid 65534 claiming 256 MiB with one page of DOF, in a loop"


def _in_loop(what: Callable[[], object], stop: threading.Event) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            what()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def _foreign_loop(
    daemon: DaemonHandle, work: Path, one_round: Callable[[ForeignClients], object]
) -> Iterator[None]:
    foreign = ForeignClients(work, daemon.device)
    stop = threading.Event()
    thread = _in_loop(lambda: one_round(foreign), stop)
    try:
        yield
    finally:
        stop.set()
        thread.join(600)
        foreign.close()


@contextlib.contextmanager
def attack_huge_commits(daemon: DaemonHandle, work: Path) -> Iterator[str]:
    dofs = [write_dof(work, f"huge{i}", probes_dof(65536, f"huge{i}")) for i in range(5)]

    def one_round(foreign: ForeignClients) -> None:
        procs = [foreign.start() for _ in dofs]
        for proc, dof in zip(procs, dofs, strict=True):
            proc.send({"op": "register", "dof_file": str(dof)}, answer=False)
        for proc in procs:
            proc.read(timeout=600)
            proc.exit()

    with _foreign_loop(daemon, work, one_round):
        yield "5 processes of uid 65534 registering 65536-probe DOF at once, again and again"


@contextlib.contextmanager
def attack_slow_parse(daemon: DaemonHandle, work: Path) -> Iterator[str]:
    hostile = write_plain_dof(work, "slow", slow_dof())
    argv = [sys.executable, "-c", LOOP, str(REPO), str(daemon.device), str(hostile), "3600"]
    with _loop_procs([argv]) as procs:
        _ready_then_drain(procs)
        yield "uid 65534 sending a valid DOF that parses for ~1 s, in a loop (-t 0.4)"


@contextlib.contextmanager
def attack_large_dof(daemon: DaemonHandle, work: Path) -> Iterator[str]:
    big = write_dof(work, "large", padded_dof(probes_dof(3, "large"), 256 * MIB))

    def one_round(foreign: ForeignClients) -> None:
        swarm = foreign.start()
        swarm.send({"op": "swarm", "count": 6, "dof_file": str(big)}, answer=False)
        swarm.read(timeout=600)
        swarm.exit()

    with _foreign_loop(daemon, work, one_round):
        yield "6 processes of uid 65534 registering a valid 256 MiB DOF at once, again and again"


@contextlib.contextmanager
def attack_arg_bomb(daemon: DaemonHandle, work: Path) -> Iterator[str]:
    bomb = write_dof(work, "bomb", _argument_bomb())

    def one_round(foreign: ForeignClients) -> None:
        proc = foreign.start()
        proc.register(bomb)
        proc.exit()

    with _foreign_loop(daemon, work, one_round):
        yield "fresh processes of uid 65534 registering the 610 × 255 argument-type DOF"


ATTACKS: dict[str, tuple[Callable[[DaemonHandle, Path], contextlib.AbstractContextManager[str]], list[str]]] = {
    "flock": (attack_flock, []),
    "stuck-fuse": (attack_stuck_fuse, []),
    "claims": (attack_claims, []),
    "huge-commits": (attack_huge_commits, []),
    "slow-parse": (attack_slow_parse, ["-t", "0.4"]),
    "large-dof": (attack_large_dof, []),
    "arg-bomb": (attack_arg_bomb, []),
}  # fmt: skip


def measure(name: str, canaries: int, settle: float) -> dict[str, object]:
    start, extra = ATTACKS[name]
    base = Path(tempfile.mkdtemp(prefix=f"bench-attack-{name}-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix=f"bench-attack-{name}-", dir="/dev/shm"))
    base.chmod(0o755)  # other users' files live here
    shm.chmod(0o755)  # as /run/dtrace: any user can open the state directory
    daemon = start_daemon(
        base, device=base / "helper", state_dir=shm / "run", extra_args=extra, debug=False
    )
    clients = Clients(base, daemon.device)
    try:
        small = write_dof(base, "small", code_dof().data)
        canary = Canary(clients, small)
        canary.run(10)  # warm-up: the parser, the writer, the page cache
        calm, calm_failed = canary.run(canaries)
        rest = _status_kib(daemon.pid, "VmRSS")
        with start(daemon, base) as what:
            time.sleep(settle)  # the attack under way
            hot, hot_failed = canary.run(canaries)
            peak = _status_kib(daemon.pid, "VmHWM")
        alive = daemon.proc.poll() is None
        return {
            "attack": name,
            "what": what,
            "calm_p50_ms": statistics.median(calm) * 1e3,
            "calm_p99_ms": _pct(calm, 0.99) * 1e3,
            "hot_p50_ms": statistics.median(hot) * 1e3,
            "hot_p99_ms": _pct(hot, 0.99) * 1e3,
            "hot_max_ms": max(hot) * 1e3,
            "failed": calm_failed + hot_failed,
            "peak_above_rest_mib": (peak - rest) / 1024,
            "daemon_alive": alive,
        }
    finally:
        clients.close()
        if daemon.proc.poll() is None:
            with contextlib.suppress(Exception):
                finish(daemon)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--canaries", type=int, default=200, help="registrations per phase")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of attack before timing")
    ap.add_argument("--only", nargs="*", choices=sorted(ATTACKS), help="attacks to run")
    ap.add_argument("--quick", action="store_true", help="50 canaries per phase")
    args = ap.parse_args()
    canaries = 50 if args.quick else args.canaries
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    print(
        f"{'attack':<13} | {'calm p50':>8} {'p99':>8} | {'attack p50':>10} {'p99':>8} "
        f"{'max':>8} | {'ratio':>6} | {'failed':>6} | {'peak+':>7} | alive"
    )
    results: list[dict[str, object]] = []
    for name in args.only or list(ATTACKS):
        r = measure(name, canaries, args.settle)
        results.append(r)
        calm50, calm99 = float(r["calm_p50_ms"]), float(r["calm_p99_ms"])  # type: ignore[arg-type]
        hot50, hot99 = float(r["hot_p50_ms"]), float(r["hot_p99_ms"])  # type: ignore[arg-type]
        hotmax, peak = float(r["hot_max_ms"]), float(r["peak_above_rest_mib"])  # type: ignore[arg-type]
        print(
            f"{name:<13} | {calm50:8.2f} {calm99:8.2f} | {hot50:10.2f} {hot99:8.2f} "
            f"{hotmax:8.1f} | {hot50 / calm50:6.2f} | {r['failed']:>6} | {peak:6.0f}M | "
            f"{r['daemon_alive']}",
            flush=True,
        )
    print("json:", json.dumps(results))


if __name__ == "__main__":
    main()
