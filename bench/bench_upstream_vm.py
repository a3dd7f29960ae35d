"""ADDDOF latency against upstream's C dtprobed 2.0.7 and ours, side by side in one CUSE VM.

Run on the host, as root: ``.venv/bin/python bench/bench_upstream_vm.py [--rounds N]``.

Upstream's daemon is Debian's ``libdtrace2`` 2.0.7 ``/usr/sbin/dtprobed``, run chrooted
in the sid chroot of ``tests/realdtrace/chroot.sh`` (as ``tests/realdtrace/upstream_goldens.sh``
runs it) on ``/dev/dtrace/helper`` with its state on a fresh tmpfs; ours is this tree's
``python -m dtprobed`` in CUSE mode on ``/dev/dtrace/helper-py`` with its state on the
guest's tmpfs. Both run in one VM booted by ``tools/cuse-vm/cuse-vm.sh`` (a kernel with
CUSE: upstream's daemon has no FUSE-file mode).

The client is one ``.SUNW_dof`` program built by ``tests/support/sunw_dof.py`` (3 probes,
PIE: upstream cannot register heap DOF, so DOF embedded in the object, registered from its
constructor the way drti <= 2.0.2 did). Each round starts it once per daemon, the daemons'
order alternating from round to round; each start gives two samples, both timed inside
the program by ``bench/bench_upstream_vm.c`` (an ``LD_PRELOAD`` shim around the real
``ioctl``):

* **small DOF**: the constructor's ``ioctl(DTRACEHIOC_ADDDOF)`` in a freshly exec'd process;
* **fork**: the re-registration drti's ``pthread_atfork`` handler makes in a fork child
  (the parent's mapping, relocation base and DOF bytes).

Beside them, in the same rounds, the floor of our design (``bench/floor_small.py``, chain 7:
the device thread, a worker, and fetch, parse and writer children doing the least their
roles need) on ``/dev/dtrace/helper-floor``, and the same chain without the parse (what a
fork child's registration costs us: the parse cache answers it) on
``/dev/dtrace/helper-floor-np``, both FUSE files.

Prints the medians, ours/upstream and floor/upstream per case. Absolute times under
emulation (TCG, one vCPU) mean little; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.floor_small import FloorServer
from tests.realkernel.harness import REPO, PrivateDaemon
from tests.support.sunw_dof import SunwProbe, SunwProgram, SunwProvider, build_sunw_object

HERE = Path(__file__).resolve().parent
UPSTREAM_DEVICE = "/dev/dtrace/helper"
OUR_DEVICE = "/dev/dtrace/helper-py"
FLOOR_DEVICES = {
    "floor": "/dev/dtrace/helper-floor",
    "floor, no parse": "/dev/dtrace/helper-floor-np",
}
DAEMONS = ("upstream", "ours", *FLOOR_DEVICES)
CASES = ("small DOF", "fork")
PROVIDERS = [SunwProvider("benchprov", tuple(SunwProbe(f"p{i}") for i in range(3)))]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_for(pred: object, what: str, limit: float = 60.0) -> None:
    assert callable(pred)
    end = time.monotonic() + limit
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Upstream:
    """Upstream's dtprobed -F in the chroot, on the default helper and /run/dtrace (tmpfs)."""

    def __init__(self, root: str, log: Path) -> None:
        self.root = root
        for argv in (
            ["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", f"{root}/run"],
            ["mount", "-t", "proc", "proc", f"{root}/proc"],
            ["mount", "--rbind", "/dev", f"{root}/dev"],
        ):
            subprocess.run(argv, check=True)
        env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["chroot", root, *env, "/usr/sbin/dtprobed", "-F"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            lambda: (
                self.proc.poll() is not None
                or (os.path.exists(UPSTREAM_DEVICE) and os.path.isdir(f"{root}/run/dtrace/stash"))
            ),
            "upstream's dtprobed",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"upstream's dtprobed exited {self.proc.returncode}: {log.read_text()}"
            )
        time.sleep(0.5)  # its start-up prune and reparse of the empty stash

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def one_run(exe: Path, shim: Path, device: str, log: Path) -> tuple[float, float]:
    """Start the program on *device*, fork once: (constructor's ADDDOF, fork child's) in ms."""
    log.unlink(missing_ok=True)
    prog = SunwProgram.start(
        exe, devname=device, env={"LD_PRELOAD": str(shim), "BENCH_IOCTL_LOG": str(log)}, debug=False
    )
    try:
        child = int(prog.command("k").split()[1])
        prog.command("w")
    finally:
        prog.quit()
    samples: dict[int, tuple[int, int]] = {}
    for line in log.read_text().splitlines():
        pid, ns, result, err = (int(x) for x in line.split())
        if result < 0:
            raise RuntimeError(f"{device}: ADDDOF of pid {pid} failed with errno {err}")
        samples[pid] = (ns, result)
    if prog.pid not in samples or child not in samples:
        raise RuntimeError(f"{device}: missing samples in {log.read_text()!r}")
    return samples[prog.pid][0] / 1e6, samples[child][0] / 1e6


def measure(rounds: int, tmp: Path, root: str, exe: Path, shim: Path) -> None:
    print(f"program: {exe} (3 probes, .SUNW_dof, PIE)")
    upstream = Upstream(root, tmp / "upstream.log")
    (tmp / "state").mkdir()
    ours = PrivateDaemon(OUR_DEVICE, tmp / "state", "cuse", tmp / "ours.log")
    floors: list[FloorServer] = []
    try:
        ours.start()
        for name, device in FLOOR_DEVICES.items():
            (tmp / name).mkdir()
            floors.append(FloorServer(device, str(tmp / name), 7, parse=name == "floor"))
        devices = {"upstream": UPSTREAM_DEVICE, "ours": OUR_DEVICE, **FLOOR_DEVICES}
        samples: dict[tuple[str, str], list[float]] = {(d, c): [] for d in DAEMONS for c in CASES}
        for name in DAEMONS:  # warm-up: page cache, our children's first requests
            for attempt in range(5):
                try:
                    one_run(exe, shim, devices[name], tmp / "warm.log")
                    break
                except RuntimeError as err:
                    # under emulation a daemon may still be starting (upstream's start-up
                    # prune and reparse): its first registrations get EINVAL
                    print(f"warm-up of {name}, attempt {attempt + 1}: {err}", flush=True)
                    if attempt == 4:
                        raise
                    time.sleep(2)
        for r in range(rounds):
            for name in DAEMONS if r % 2 == 0 else DAEMONS[::-1]:
                fresh, fork = one_run(exe, shim, devices[name], tmp / f"{name}.log")
                samples[(name, "small DOF")].append(fresh)
                samples[(name, "fork")].append(fork)
        print(f"{'case':>10} {'daemon':>16} {'median ms':>10} {'p90 ms':>8} {'n':>3}")
        for case in CASES:
            for name in DAEMONS:
                s = samples[(name, case)]
                print(
                    f"{case:>10} {name:>16} {statistics.median(s):>10.2f} "
                    f"{quantile(s, 0.9):>8.2f} {len(s):>3}"
                )
            up = statistics.median(samples[("upstream", case)])
            for name in DAEMONS[1:]:
                ratio = statistics.median(samples[(name, case)]) / up
                print(f"{case:>10} median ratio {name}/upstream = {ratio:.2f}")
    except BaseException:
        for log in (tmp / "upstream.log", tmp / "ours.log"):
            if log.exists():
                print(f"--- end of {log.name}:\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        for floor in floors:
            floor.stop()
        if ours.proc is not None:
            ours.stop(signal.SIGTERM)
        ours.cleanup()
        upstream.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21, help="program starts per daemon")
    ap.add_argument("--in-vm", nargs=3, metavar=("ROOT", "EXE", "SHIM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_vm:
        root, exe, shim = args.in_vm
        with tempfile.TemporaryDirectory() as tmp:
            measure(args.rounds, Path(tmp), root, Path(exe), Path(shim))
        return
    if os.geteuid() != 0:
        raise SystemExit("must run as root (the VM, the chroot)")
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    root = subprocess.run(
        [str(REPO / "tests" / "realdtrace" / "chroot.sh")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    exe = build_sunw_object(PROVIDERS, kind="pie", name="benchsunw").path
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
        shim = Path(tmp) / "bench_upstream_vm.so"
        gcc = shutil.which("gcc") or "gcc"
        subprocess.run(
            [
                gcc,
                "-O2",
                "-Wall",
                "-shared",
                "-fPIC",
                "-o",
                str(shim),
                str(HERE / "bench_upstream_vm.c"),
                "-ldl",
            ],
            check=True,
        )
        vm = [str(REPO / "tools" / "cuse-vm" / "cuse-vm.sh"), "--timeout", "1800", "--share", tmp]
        if sys.prefix.startswith("/tmp/"):
            vm += ["--share", sys.prefix]
        guest = [
            sys.executable,
            __file__,
            "--rounds",
            str(args.rounds),
            "--in-vm",
            root,
            str(exe),
            str(shim),
        ]
        result = subprocess.run([*vm, "--", *guest], cwd=REPO, check=False)
        sys.exit(result.returncode)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
