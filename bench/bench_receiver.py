"""What a USDT program sees: ioctl latency, throughput and prune delay through the FUSE helper.

Runs a private daemon (FUSE mode, private helper path and state dir, no debug
logging) and real client processes.  Each registration is made by a fresh
forked process, as a program starting up would: every one creates its own
``dof-pid/$pid`` tree, and every one is pruned when it exits.

Measures:

1. client-observed ``ioctl(ADDDOF)`` wall time (p50/p99) for a 3-probe DOF,
   a 2000-probe DOF without arguments and a 2000-probe DOF with 3 arguments
   each (~206 KiB, upstream's tst.manyprobes size); every client is a fork
   child of this script holding the same mapping, so since the daemon's parse
   cache these are fork re-registrations (the parser is skipped):
   ``bench/profile_registration.py`` measures fresh bytes per client too;
2. registrations per second from many concurrent short-lived clients, forked
   by this script and by a C load generator (``tests/realkernel/client.c``
   ``load N C``: this script's own fork cost caps the first figure);
3. time from a client's exit (its parent's ``waitpid`` returning) to its
   ``dof-pid/$pid`` directory being gone;
4. p99 of small registrations while a 20000-probe registration is in flight, from
   the huge one's uid and from another uid.

Usage: ``.venv/bin/python bench/bench_receiver.py [--quick] [--dir DIR]``

The state dir goes on tmpfs (``/dev/shm``) by default, as ``/run/dtrace`` does
in production; on a journaling disk filesystem every registration costs
several times more.
Targets (issue 4): p50 ≤ 1 ms, p99 ≤ 5 ms small; ≥ 1000 reg/s; prune ≤ 100 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import mmap
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper
from common.ioctl import DTRACEHIOC_ADDDOF
from tests.realkernel.harness import build_c_client, probes_dof
from tests.support.client import CODE_ADDR, CODE_SIZE, map_file, object_bytes
from tests.support.daemon import finish, start_daemon

#: Where the huge DOF's object text goes, while the small one's stays at CODE_ADDR.
HUGE_BASE = CODE_ADDR + 0x1000_0000
#: The small registrations of "another uid" during a huge one (nobody).
OTHER_UID = 65534


def small_dof() -> bytes:
    probes = [
        ProbeSpec("main", f"p{i}", [0x10], addr=CODE_ADDR + 0x100 * (i + 1)) for i in range(3)
    ]
    return build_dof([ProviderSpec("bench", probes)]).data


def many_dof(nprobes: int, nargs: int, base: int = CODE_ADDR) -> bytes:
    args = ["int", "char *", "long"][:nargs]
    probes = [
        ProbeSpec(
            f"test_function_{i:05d}",
            f"test_probe_{i:05d}",
            [0x4],
            addr=base + 2 * (i % (CODE_SIZE // 2 - 8)),
            native=args,
        )
        for i in range(nprobes)
    ]
    return build_dof([ProviderSpec("bench", probes)]).data


def map_object(path: Path, size: int, base: int) -> bytearray:
    """Map an object of write_object (text at *base*, its DOF of *size* bytes after it)."""
    text = mmap.PROT_READ | mmap.PROT_EXEC
    map_file(str(path), CODE_SIZE, text, base, replace=True)
    addr = map_file(str(path), size, mmap.PROT_READ, offset=CODE_SIZE)
    return bytearray(build_helper("bench", addr=0, dof=addr))


def register_elsewhere(device: str, path: Path, size: int, base: int) -> tuple[float, int]:
    """One registration of an object from a new process (``--register-object``), so it is
    pruned when that process exits: (ioctl seconds, result)."""
    out = subprocess.run(
        [sys.executable, __file__, "--register-object", device, str(path), str(size), str(base)],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.split()
    return (float(out[0]), int(out[1])) if len(out) == 2 else (0.0, -1)


class Bench:
    def __init__(self, device: Path, workdir: Path) -> None:
        self.device = str(device)
        self.workdir = workdir
        code = workdir / "code.bin"
        code.write_bytes(b"\xcc" * CODE_SIZE)
        map_file(str(code), CODE_SIZE, mmap.PROT_READ | mmap.PROT_EXEC, CODE_ADDR)
        self._n = 0

    def write_object(self, data: bytes) -> Path:
        """A new object file: text, then *data*."""
        self._n += 1
        path = self.workdir / f"dof{self._n}.dof"
        path.write_bytes(object_bytes(data))
        return path

    def mapped_helper(self, data: bytes, base: int = CODE_ADDR) -> bytearray:
        """Write an object file (text, then *data*), map its text at *base* and its DOF
        after it (file-backed, like an ELF object); return the helper."""
        return map_object(self.write_object(data), len(data), base)

    def register_timed(self, helper: bytearray) -> tuple[float, int]:
        """(ioctl seconds, result or -errno) for one ADDDOF from this process."""
        fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        try:
            t0 = time.perf_counter()
            try:
                result = fcntl.ioctl(fd, DTRACEHIOC_ADDDOF, helper, True)
            except OSError as err:
                result = -(err.errno or 0)
            return time.perf_counter() - t0, result
        finally:
            os.close(fd)

    def in_children(
        self, helper: bytearray, count: int, concurrency: int, uid: int | None = None
    ) -> list[tuple[float, int, int]]:
        """Fork *count* short-lived children (at most *concurrency* at once), each
        registering once (as *uid*, if given); returns (ioctl seconds, result, pid) per child."""
        r, w = os.pipe()
        results: list[tuple[float, int, int]] = []
        running = 0
        started = 0
        buf = b""
        while len(results) < count:
            while running < concurrency and started < count:
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    if uid is not None:
                        os.setgid(uid)
                        os.setuid(uid)
                    elapsed, result = self.register_timed(helper)
                    os.write(w, f"{elapsed} {result} {os.getpid()}\n".encode())
                    os._exit(0)
                running += 1
                started += 1
            os.waitpid(-1, 0)
            running -= 1
            # collect whatever lines arrived
            os.set_blocking(r, False)
            with contextlib.suppress(BlockingIOError):
                buf += os.read(r, 1 << 16)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                a, b, c = line.split()
                results.append((float(a), int(b), int(c)))
            if running == 0 and started == count and len(results) < count:
                os.set_blocking(r, True)
                buf += os.read(r, 1 << 16)
        os.close(r)
        os.close(w)
        return results


def c_load(device: Path, workdir: Path, count: int, concurrency: int) -> float | None:
    """Registrations/s from tests/realkernel/client.c's ``load`` command (None: no gcc)."""
    if shutil.which("gcc") is None:
        print("throughput (C load generator): skipped, no gcc")
        return None
    binary = build_c_client(workdir)
    dof_file = workdir / "load.dof"
    dof_file.write_bytes(probes_dof("load", 3))
    out = subprocess.run(
        [str(binary), str(device), str(dof_file), f"load {count} {concurrency}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out[0] == "load", out[:3]
    wall = int(out[1]) / 1e9
    failed = int(out[2])
    lat = [int(x) / 1e9 for x in out[3:]]
    rate = (count - failed) / wall
    print(
        f"throughput (C load generator): {count - failed} registrations by {count} processes "
        f"({concurrency} at a time) in {wall:.2f} s = {rate:.0f} reg/s, {failed} failed; "
        f"open+ioctl+close p50 {ms(pct(lat, 0.5))}, p99 {ms(pct(lat, 0.99))}"
    )
    return rate


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


def wait_gone(path: Path, timeout: float = 10.0) -> float:
    t0 = time.perf_counter()
    while path.exists():
        if time.perf_counter() - t0 > timeout:
            return float("inf")
        time.sleep(0.0002)
    return time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument(
        "--dir",
        default="/dev/shm",
        help="where the state dir goes; tmpfs like /run in production (default %(default)s)",
    )
    ap.add_argument(
        "--small-only", action="store_true", help="only the 3-probe ADDDOF latency (part 1)"
    )
    ap.add_argument(
        "--huge-only",
        action="store_true",
        help="only part 4 (small registrations during 20000-probe ones)",
    )
    ap.add_argument("--register-object", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.register_object:
        device, path, size, base = args.register_object
        helper = map_object(Path(path), int(size), int(base))
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        t0 = time.perf_counter()
        try:
            result = fcntl.ioctl(fd, DTRACEHIOC_ADDDOF, helper, True)
        except OSError as err:
            result = -(err.errno or 0)
        print(time.perf_counter() - t0, result)
        return
    n_small = 200 if args.quick else 1000
    n_big = 10 if args.quick else 30
    n_rate = 500 if args.quick else 2000
    n_prune = 50 if args.quick else 200
    n_huge_rounds = 2 if args.quick else 3
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-receiver-", dir=args.dir) as tmp:
        tmp_path = Path(tmp)
        os.chmod(tmp, 0o755)  # part 4's clients of another uid open the helper in it
        daemon = start_daemon(tmp_path, debug=False)
        try:
            bench = Bench(daemon.device, tmp_path)
            report: dict[str, object] = {}

            if not args.huge_only:
                # 1. latency, each registration from a fresh process, one at a time
                for label, data, count in [
                    ("3 probes", small_dof(), n_small),
                    ("2000 probes, no args", many_dof(2000, 0), n_big),
                    ("2000 probes, 3 args", many_dof(2000, 3), n_big),
                ]:
                    helper = bench.mapped_helper(data)
                    res = bench.in_children(helper, count, 1)
                    ok = [t for t, r, _ in res if r >= 0]
                    failed = len(res) - len(ok)
                    print(
                        f"ADDDOF {label:22s} ({len(data):7d} bytes): p50 {ms(pct(ok, 0.5))}, "
                        f"p99 {ms(pct(ok, 0.99))}, n={len(ok)}"
                        + (f", {failed} failed" if failed else "")
                    )
                    report[label] = {"p50_ms": pct(ok, 0.5) * 1000, "p99_ms": pct(ok, 0.99) * 1000}
                    if args.small_only:
                        return
                daemon.wait_for("prune", lambda: daemon.stash_pids() == [], 60)

                # 2. throughput: many concurrent short-lived clients
                helper = bench.mapped_helper(small_dof())
                t0 = time.perf_counter()
                res = bench.in_children(helper, n_rate, 64)
                wall = time.perf_counter() - t0
                ok = [t for t, r, _ in res if r >= 0]
                print(
                    f"throughput: {len(ok)} registrations by {n_rate} processes (64 at a time) in "
                    f"{wall:.2f} s = {len(ok) / wall:.0f} reg/s; ioctl p50 {ms(pct(ok, 0.5))}, "
                    f"p99 {ms(pct(ok, 0.99))}"
                )
                report["reg_per_s"] = len(ok) / wall
                daemon.wait_for("prune", lambda: daemon.stash_pids() == [], 60)

                # 2b. the same from a C load generator: Python's fork of this process
                # and FUSE open/close alone cap the figure above at roughly 800/s here
                c_rate = c_load(daemon.device, tmp_path, n_rate * 4, 64)
                if c_rate is not None:
                    report["reg_per_s_c"] = c_rate
                daemon.wait_for("prune", lambda: daemon.stash_pids() == [], 120)

                # 3. exit -> stash entries gone
                delays = []
                dofpid = daemon.state_dir / "stash" / "dof-pid"
                helper = bench.mapped_helper(small_dof())
                for _ in range(n_prune):
                    go_r, go_w = os.pipe()
                    pid = os.fork()
                    if pid == 0:
                        os.close(go_w)
                        bench.register_timed(helper)
                        os.read(go_r, 1)
                        os._exit(0)
                    os.close(go_r)
                    daemon.wait_for("registration", lambda p=pid: (dofpid / str(p)).exists())  # type: ignore[misc]
                    os.close(go_w)  # child exits
                    os.waitpid(pid, 0)
                    exited = time.perf_counter()
                    delays.append(wait_gone(dofpid / str(pid)) - exited)
                print(
                    f"prune after exit: p50 {ms(pct(delays, 0.5))}, p99 {ms(pct(delays, 0.99))}, max {ms(max(delays))}, n={len(delays)}"
                )
                report["prune_p50_ms"] = pct(delays, 0.5) * 1000
                report["prune_p99_ms"] = pct(delays, 0.99) * 1000

            # 4. small registrations while a 20000-probe one is in flight: from the
            # huge one's uid (its parse time makes the fairness rules send that uid's
            # next requests to the large lane, behind it) and from another uid
            small = bench.mapped_helper(small_dof())
            baseline = [t for t, r, _ in bench.in_children(small, 100, 1) if r >= 0]
            huge_dof = many_dof(20000, 3, HUGE_BASE)
            huge_path = bench.write_object(huge_dof)
            for label, uid in (("same uid", None), ("another uid", OTHER_UID)):
                during: list[float] = []
                failures = 0
                huge_times = []
                for _ in range(n_huge_rounds):
                    # a new process each round: a real 20000-probe commit every time
                    outcome: dict[str, tuple[float, int]] = {}

                    def huge_one(out: dict[str, tuple[float, int]] = outcome) -> None:
                        out["huge"] = register_elsewhere(
                            str(daemon.device), huge_path, len(huge_dof), HUGE_BASE
                        )

                    thread = threading.Thread(target=huge_one)
                    thread.start()
                    t0 = time.perf_counter()
                    while thread.is_alive() and time.perf_counter() - t0 < 120:
                        for t, r, _ in bench.in_children(small, 5, 1, uid):
                            if r >= 0:
                                during.append(t)
                            else:
                                failures += 1
                    thread.join()
                    huge_t, huge_r = outcome["huge"]
                    if huge_r < 0:
                        failures += 1
                    huge_times.append(huge_t)
                print(
                    f"20000-probe ADDDOF x{n_huge_rounds}: {ms(min(huge_times))}-{ms(max(huge_times))}; "
                    f"small ADDDOF meanwhile, {label}: n={len(during)}, "
                    f"p50 {ms(pct(during, 0.5)) if during else '-'}, "
                    f"p99 {ms(pct(during, 0.99)) if during else '-'}, "
                    f"max {ms(max(during)) if during else '-'}, {failures} failed; "
                    f"alone: p50 {ms(pct(baseline, 0.5))}, p99 {ms(pct(baseline, 0.99))}"
                )
                report[f"during_huge_{label.replace(' ', '_')}"] = {
                    "huge_s": huge_times,
                    "small_p99_ms": pct(during, 0.99) * 1000 if during else None,
                    "small_p50_ms": pct(during, 0.5) * 1000 if during else None,
                }
            print("json:", json.dumps(report))
        finally:
            finish(daemon)


if __name__ == "__main__":
    main()
