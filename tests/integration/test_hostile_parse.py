"""Row "DOF whose parse exceeds -t, sent in a loop": the sender pays, not the lane.

Before: the parser was killed on each such request and the *lane's* back-off grew
to 16 s, so 10 of 11 legitimate 2000-probe registrations failed during the attack
and right after it, and the log took 62 000 ERROR lines in a minute.  Now a parser
killed over a request penalises the sender's uid (its next requests are refused at
once, for a doubling, bounded time), the next request gets a fresh parser at once,
and the sender's log lines are rate-limited with counts of what was suppressed.

The hostile DOF is valid and simply slow to parse: 65536 probes × 4 tracepoints ×
10 argument types (42 MB; ~1.1 s of silent parsing in-process on this machine kind)
against ``-t 0.4``, while an ordinary 2000-probe DOF parses in ~10 ms through the
child.  A real hostile process (uid 65534) sends it in a loop; root's canaries, a
small DOF and a 2000-probe one (the large lane, the same lane as the attack),
register meanwhile and must all succeed.  Latency under attack: ``bench/bench_attack.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from tests.support.client import CODE_ADDR
from tests.support.clients import Clients, code_dof, write_dof, write_plain_dof
from tests.support.daemon import REPO, DaemonFactory

pytestmark = pytest.mark.timeout(300)

HOSTILE_UID = 65534
TIMEOUT = 0.4  # -t
LOG_BURST, LOG_RATE = 10, 2.0
ATTACK_SECONDS = 6.0

#: A hostile client: maps FILE (a DOF), opens the helper, becomes uid 65534 (another
#: user than the root canaries) and calls ADDDOF in a loop for SECONDS; prints
#: {"ready": true} first and {"results": {result or -errno: count}} at the end.
LOOP = r"""
import collections, ctypes, fcntl, json, mmap, os, sys, time
sys.path.insert(0, sys.argv[1])
from common.dof_build import build_helper
from common.ioctl import DTRACEHIOC_ADDDOF
device, path, seconds = sys.argv[2], sys.argv[3], float(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open(path, os.O_RDONLY)
addr = libc.mmap(None, os.fstat(fd).st_size, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
dev = os.open(device, os.O_RDWR)
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
helper = bytearray(build_helper("slowparse", addr=0, dof=addr))
print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
results = collections.Counter()
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        results[fcntl.ioctl(dev, DTRACEHIOC_ADDDOF, helper, True)] += 1
    except OSError as err:
        results[-err.errno] += 1
print(json.dumps({"results": results}), flush=True)
"""


def slow_dof() -> bytes:
    """Valid, at the parser's probe and tracepoint limits, with 10 argument types each."""
    types: list[str | bytes] = [f"type_{j}_" + "x" * 20 for j in range(10)]
    probes = [
        ProbeSpec(
            f"f{i // 100}",
            f"p{i}",
            [0x10, 0x14, 0x18, 0x1C],
            addr=CODE_ADDR + 0x100,
            native=types,
            xlat=types,
            argmap=list(range(10)),
        )
        for i in range(65536)
    ]
    return build_dof([ProviderSpec("slow", probes)]).data


def canary_2000() -> bytes:
    """2000 probes, ~200 KB: the large lane, the attack's lane."""
    probes = [
        ProbeSpec(f"fn{i:05d}", f"pr{i:05d}", [0x4], addr=CODE_ADDR + 0x20 * i, native=["int"])
        for i in range(2000)
    ]
    return build_dof([ProviderSpec("canary", probes)]).data


def test_slow_parses_in_a_loop_cost_only_their_sender(
    daemon_factory: DaemonFactory, tmp_path: Path, shm: Path
) -> None:
    # -t also bounds the writer's silence: it reports progress every -t / 4 meanwhile.
    daemon = daemon_factory.start(
        state_dir=shm,
        debug=False,  # the log as production writes it (-d logs every FUSE request)
        extra_args=[
            *("-t", str(TIMEOUT), "--penalty-first", "0.5", "--penalty-max", "2"),
            *("--log-burst", str(LOG_BURST), "--log-rate", str(LOG_RATE)),
        ],
    )
    small = write_dof(tmp_path, "small", code_dof().data)
    large = write_dof(tmp_path, "large", canary_2000())
    hostile = write_plain_dof(tmp_path, "slow", slow_dof())
    clients = Clients(tmp_path, daemon.device)
    started = time.monotonic()
    attacker = subprocess.Popen(
        [sys.executable, "-c", LOOP, str(REPO), str(daemon.device), str(hostile), str(ATTACK_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )  # fmt: skip
    try:
        assert attacker.stdout is not None
        hello = json.loads(attacker.stdout.readline())
        assert hello["ready"], hello
        answers = []
        rounds = 0
        while attacker.poll() is None or rounds < 2:
            # Fresh canaries now and then, so the per-process probe quota never matters.
            if rounds % 4 == 0:
                small_client, large_client = clients.start(), clients.start()
            answers.append(("small", small_client.register(small)))
            answers.append(("large", large_client.register(large)))
            rounds += 1
            if time.monotonic() - started > ATTACK_SECONDS + 60:
                break
        done = json.loads(attacker.stdout.readline())
        assert attacker.wait(30) == 0
        elapsed = time.monotonic() - started
        # Right after the attack too: nothing is backed off for anyone but the sender.
        answers.append(("large after", clients.start().register(large)))
        answers.append(("small after", clients.start().register(small)))
        failed = [(what, a) for what, a in answers if "gen" not in a]
        assert not failed, failed
        assert rounds >= 2
        results = {int(k): v for k, v in done["results"].items()}
        assert not [r for r in results if r >= 0], results  # nothing of the attack registered
        attempts = sum(results.values())
        log = daemon.log_text()
        kills = log.count(f"uid {HOSTILE_UID} refused for")
        assert kills >= 1, log[-3000:]  # the parser was killed over it, at least once
        assert re.search(r"request failed, child broke: .*parser", log), log[-3000:]
        assert "uid 0 is refused" not in log and "uid 0 refused" not in log
        # The sender's log lines stay within its rate, plus one count line per allowed line.
        theirs = [
            line
            for line in log.splitlines()
            if f"{hello['pid']}: dtprobed:" in line or f"uid {HOSTILE_UID}:" in line
        ]
        bound = 2 * (LOG_BURST + LOG_RATE * elapsed + 2)
        assert len(theirs) <= bound, (len(theirs), bound, attempts)
        assert attempts > bound, attempts  # so lines were suppressed...
        assert f"uid {HOSTILE_UID}: " in log and "similar lines suppressed" in log  # ...counted
        # The whole log: start-up, the canaries' lines, the sender's bounded share.
        assert len(log.splitlines()) <= 40 + 3 * len(answers) + bound, len(log.splitlines())
        assert daemon.proc.poll() is None  # the daemon never exits over what clients send
        stashed = set(daemon.stash_pids())
        assert {c.pid for c in clients.started} <= stashed
        daemon.verify()
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        clients.close()
