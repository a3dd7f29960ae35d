"""Client-observed ADDDOF latency, CUSE mode vs FUSE-file mode, side by side in one VM.

Run on the host: ``.venv/bin/python bench/bench_cuse_vs_fuse.py [--rounds N]``.  It
builds tests/realkernel/client.c, boots one VM with tools/cuse-vm/cuse-vm.sh and
re-runs itself there with ``--in-vm``: one private daemon per mode, one C client per
mode and DOF size, registrations alternating between the modes round by round; each
latency is the client's own clock around ``ioctl(DTRACEHIOC_ADDDOF)``.  Prints
medians, p90 and the CUSE/FUSE ratio.  Absolute times under emulation (TCG) mean
little; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.dof_build import many_probes_dof
from tests.realkernel.harness import (
    REPO,
    ClientProcess,
    PrivateDaemon,
    build_c_client,
    client_kinds,
    private_device,
    probes_dof,
)

MODES = ("cuse", "fuse")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(rounds: int, tmp: Path) -> None:
    kind = client_kinds(build_c_client(tmp))["c"]
    dofs = {
        "3-probe": probes_dof("bench3"),
        "2000-probe": many_probes_dof(2000, relocate=True).data,
    }
    daemons: dict[str, PrivateDaemon] = {}
    clients: list[ClientProcess] = []
    try:
        for mode in MODES:
            mdir = tmp / mode
            (mdir / "state").mkdir(parents=True)
            daemons[mode] = PrivateDaemon(
                private_device(mode, mdir), mdir / "state", mode, mdir / "dtprobed.log"
            )
            daemons[mode].start()
        print(f"{'DOF':>11} {'bytes':>7} {'mode':>5} {'median ms':>10} {'p90 ms':>8} {'n':>3}")
        for label, dof in dofs.items():
            dof_file = tmp / f"{label}.dof"
            dof_file.write_bytes(dof)
            pair = {mode: ClientProcess(kind, daemons[mode].device, dof_file) for mode in MODES}
            clients += pair.values()
            samples: dict[str, list[float]] = {mode: [] for mode in MODES}
            for client in pair.values():
                client.open()
                client.ask("bench 1")  # warm-up: first registration of this process
            for _ in range(rounds):
                for mode in MODES:
                    answer = pair[mode].ask("bench 1")
                    if not answer[1].isdigit():
                        raise SystemExit(f"{mode}: registration failed: {answer}")
                    samples[mode].append(int(answer[1]) / 1e6)
            for mode in MODES:
                s = samples[mode]
                print(
                    f"{label:>11} {len(dof):>7} {mode:>5} {statistics.median(s):>10.2f} "
                    f"{quantile(s, 0.9):>8.2f} {len(s):>3}"
                )
            ratio = statistics.median(samples["cuse"]) / statistics.median(samples["fuse"])
            print(f"{label:>11} median ratio CUSE/FUSE = {ratio:.2f}")
            for client in pair.values():
                client.finish()
    finally:
        for client in clients:
            client.finish()
        for daemon in daemons.values():
            if daemon.proc is not None:
                daemon.stop(signal.SIGTERM)
            daemon.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="registrations per mode and size")
    ap.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_vm:
        with tempfile.TemporaryDirectory() as tmp:
            measure(args.rounds, Path(tmp))
        return
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-cuse-") as tmp:
        client = build_c_client(Path(tmp))
        vm = [str(REPO / "tools" / "cuse-vm" / "cuse-vm.sh"), "--timeout", "900", "--share", tmp]
        if sys.prefix.startswith("/tmp/"):
            vm += ["--share", sys.prefix]
        guest = ["env", f"DTPROBED_TEST_CLIENT={client}", sys.executable, __file__, "--in-vm"]
        result = subprocess.run(
            [*vm, "--", *guest, "--rounds", str(args.rounds)], cwd=REPO, check=False
        )
        sys.exit(result.returncode)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
