"""Hostile local users against the stash: they can't stop, stall or starve the daemon.

Each test is one row of docs/security.md ("What a hostile client can do"): a
real hostile process (or several) against a private daemon with small quotas
set by option, while other clients' registrations must keep succeeding, the
daemon must not exit, nothing may be lost and ``verify`` must stay clean.
Full-size figures are in ``bench/bench_hostile_stash.py``, not here.

A process of another user is a client started as root that drops to uid/gid
65534 (``nobody``) after its imports (the interpreter lives under ``/root``,
which that user can't read); its device, code and DOF files live in a
world-readable directory outside pytest's 0700 ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from dtprobed.stash.layout import XATTR_UID
from tests.stash.support import many_records, registration, sleepers
from tests.support.client import CODE_ADDR
from tests.support.clients import ClientHandle, Clients, code_dof, dof_bytes, wait_until, write_dof
from tests.support.daemon import DaemonFactory, DaemonHandle, status_kib

pytestmark = pytest.mark.timeout(300)

HOSTILE_UID = 65534


def probes_dof(n: int, provider: str = "big") -> bytes:
    """A valid DOF of *n* probes, every tracepoint in the clients' shared text."""
    probes = [ProbeSpec(f"f{i // 100}", f"p{i}", [0x10], addr=CODE_ADDR + 0x100) for i in range(n)]
    return build_dof([ProviderSpec(provider, probes)]).data


def as_user_python(shared: Path, uid: int = HOSTILE_UID) -> str:
    """An executable that runs ``-m tests.support.client ARGS`` as *uid* (see module doc)."""
    script = shared / f"as-{uid}.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"exec {os.path.realpath('/proc/self/exe')} -c '"
        "import os, sys\n"
        "import tests.support.client as c\n"
        f"os.setgroups([]); os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})\n"
        'sys.argv = ["client"] + sys.argv[3:]\n'
        'c.main()\' "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


class ForeignClients(Clients):
    """Clients running as another uid (files in *shared*)."""

    def __init__(self, shared: Path, device: Path, uid: int = HOSTILE_UID) -> None:
        super().__init__(shared, device)
        self.python = as_user_python(shared, uid)

    def start(self, **kwargs: Any) -> ClientHandle:
        client = ClientHandle(self.device, self.code, python=self.python, **kwargs)
        self.started.append(client)
        return client


def uid_of_pid_dir(daemon: DaemonHandle, pid: int) -> int:
    return int(os.getxattr(daemon.state_dir / "stash" / "dof-pid" / str(pid), XATTR_UID))


def parsed_files(daemon: DaemonHandle, pid: int) -> int:
    """Probe files in the parsed/ directories of *pid*'s mappings."""
    pdir = daemon.state_dir / "stash" / "dof-pid" / str(pid)
    return sum(
        len([n for n in os.listdir(m / "parsed") if n != "version"])
        for m in pdir.iterdir()
        if m.is_dir() and not m.is_symlink()
    )


def mapping_dirs(pdir: Path) -> set[str]:
    """Names of the mapping directories in ``dof-pid/$pid`` (not the generation links)."""
    return {d.name for d in pdir.iterdir() if d.is_dir() and not d.is_symlink()}


def new_mapping(pdir: Path, seen: set[str]) -> bool:
    return bool(mapping_dirs(pdir) - seen)


def alive(daemon: DaemonHandle) -> bool:
    return daemon.proc.poll() is None


# ---------------------------------------------------------------- row 1: huge commits


def test_huge_commits_neither_time_out_nor_stop_the_daemon(
    daemon_factory: DaemonFactory, tmp_path: Path, shm: Path
) -> None:
    """Five processes each register a valid 65536-probe DOF at once; -t 1.

    Each commit takes longer than -t (1.3 s alone on tmpfs here, more when they
    queue): before progress frames each missed its deadline, and after five the
    daemon exited 2.  Now they all succeed, and so does a small client meanwhile.
    """
    daemon = daemon_factory.start(
        extra_args=["-t", "1", "--max-probes-per-uid", str(1 << 20)], state_dir=shm
    )
    big = write_dof(tmp_path, "big", probes_dof(65536))
    small = write_dof(tmp_path, "small", code_dof().data)
    clients = Clients(tmp_path, daemon.device)
    try:
        hostile = [clients.start() for _ in range(5)]
        victim = clients.start()
        for h in hostile:
            h.send({"op": "register", "dof_file": str(big)}, answer=False)
        small_answers = [victim.register(small) for _ in range(5)]
        answers = [h.read(120) for h in hostile]
        small_answers.append(victim.register(small))
        assert alive(daemon), daemon.log_text()
        assert [a.get("gen") for a in answers] == [0] * 5, answers
        assert [a.get("gen") for a in small_answers] == list(range(6)), small_answers
        assert [parsed_files(daemon, h.pid) for h in hostile] == [65536] * 5
        daemon.verify()
        assert "timed out" not in daemon.log_text()
    finally:
        clients.close()


# ------------------------------------------------- row 2: one user's share of the probes


def test_one_user_can_fill_only_its_share_of_the_probes(
    daemon_factory: DaemonFactory, tmp_path: Path, shared: Path
) -> None:
    """8 processes of one user × 64 probes against a per-uid quota of 256 (total 512).

    The hostile user gets 4 registrations in, then EDQUOT; root's processes keep
    registering up to the total.  The per-uid counts are rebuilt from the
    ``trusted.dtprobed.uid`` xattrs at start-up: after a restart the hostile
    user is still at its share, root still gets in.
    """
    quota = [
        "--max-probes-per-pid",
        "64",
        "--max-probes-per-uid",
        "256",
        "--max-probes-total",
        "512",
    ]
    device = shared / "helper"
    daemon = daemon_factory.start(extra_args=quota, device=device)
    hostile_dof = write_dof(shared, "hostile", probes_dof(64, "hostile"))
    mine = write_dof(tmp_path, "mine", probes_dof(64, "mine"))
    foreign = ForeignClients(shared, device)
    clients = Clients(tmp_path, device)
    try:
        swarm = foreign.start()
        assert uid_is(swarm.pid, HOSTILE_UID)
        answer = swarm.send({"op": "swarm", "count": 8, "dof_file": str(hostile_dof)})
        results = answer["children"]
        ok = [r for r in results if "gen" in r]
        assert len(ok) == 4, results  # 4 × 64 = the user's 256
        assert all(uid_of_pid_dir(daemon, r["pid"]) == HOSTILE_UID for r in ok)
        daemon.wait_for(
            "the quota line", lambda: "probes of uid 65534 would be" in daemon.log_text()
        )
        # everyone else still gets in, up to the stash-wide total
        roots = [clients.start() for _ in range(3)]
        assert [c.register(mine).get("gen") for c in roots] == [0, 0, 0]
        assert uid_of_pid_dir(daemon, roots[0].pid) == 0
        daemon.verify()

        # a restart rebuilds the per-uid counts from the tree
        assert daemon.stop() == 0
        second = daemon_factory.start(extra_args=quota, device=device)
        late = foreign.start()
        assert late.register(hostile_dof).get("errno") is not None
        assert clients.start().register(mine).get("gen") == 0  # root: 4 × 64 of 256
        assert alive(second)
        second.verify()
        swarm.send({"op": "end_children"})
    finally:
        clients.close()
        foreign.close()


def uid_is(pid: int, uid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return line.split()[1:] == [str(uid)] * 4
    return False


# ------------------------------------------- row 2: start-up on a stash near its quotas


def _build_stash(state: Path, pids: list[tuple[int, int]], per_pid: int) -> int:
    """The stash a crashed daemon left: *per_pid* probes for each live process, written
    in-process with the Stash class (fast), then a crash's leftovers for recovery."""
    from dtprobed.stash.store import Stash

    stash = Stash(str(state))
    try:
        for pid, start in pids:
            stash.register(registration(pid, start, ino=7), many_records(per_pid, f"s{pid}"))
    finally:
        stash.close()
    # killed mid-commit: the probes/ links of one process gone (recovery relinks them)
    shutil.rmtree(state / "probes" / str(pids[0][0]))
    return len(pids) * per_pid


def _notifications(sock: socket.socket) -> Iterator[dict[str, str]]:
    while True:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return
        yield dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)


def test_start_up_on_a_large_stash_keeps_the_watchdog_fed(
    daemon_factory: DaemonFactory, tmp_path: Path, shm: Path
) -> None:
    """A crashed daemon left 4 × 32768 probes (1/8 of the default total, 1/2 of a
    user's share; scale: full size in bench/bench_hostile_stash.py); -t 0.5.

    Writer start-up (recovery + index) takes longer than -t: before, it counted
    against the first command's deadline and the daemon could not start (exit 1).
    Now READY=1 arrives, WATCHDOG=1 keeps coming before it, and registrations work.
    """
    with sleepers(4) as procs:
        total = _build_stash(shm, [(p.pid, p.start_time) for p in procs], 32768)
        notify = tmp_path / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify))
        sock.settimeout(0.2)
        try:
            daemon = daemon_factory.start(
                extra_args=["-t", "0.5"],
                state_dir=shm,
                env={"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "200000"},
            )
            before_ready: list[dict[str, str]] = []
            ready = False
            for message in _notifications(sock):
                if message.get("READY") == "1":
                    ready = True
                    break
                before_ready.append(message)
            assert ready, before_ready
            pings = [m for m in before_ready if m.get("WATCHDOG") == "1"]
            # one per 0.1 s of a start-up that takes seconds: at least a few
            assert len(pings) >= 3, before_ready
            log = daemon.log_text()
            assert f"{total} probes" in log, log
            assert "relinked probes entry" in log
            client = Clients(tmp_path, daemon.device)
            try:
                c = client.start()
                assert c.register(write_dof(tmp_path, "after", code_dof().data))["gen"] == 0
            finally:
                client.close()
            daemon.verify()
        finally:
            sock.close()


# ------------------------------------------------------------ row 3: raw bytes on disk


def test_raw_bytes_are_bounded_per_process_and_per_user(
    daemon_factory: DaemonFactory, tmp_path: Path, shared: Path
) -> None:
    """A process of another user registers distinct ~60 KB DOF files until refused.

    Before, nothing bounded raw bytes (one process stored 2 GiB on tmpfs); now the
    per-process quota stops it (and a second process of the same user stops at the
    user's), while root's registrations keep succeeding.
    """
    dofs = [write_dof(shared, f"raw{i}", probes_dof(1000, f"raw{i}")) for i in range(8)]
    size = len(dof_bytes(dofs[0]))  # raw bytes: the DOF, not the object's text
    assert 50_000 < size < 70_000, size
    device = shared / "helper"
    daemon = daemon_factory.start(
        extra_args=[
            "--max-raw-bytes-per-pid",
            str(3 * size + 100),
            "--max-raw-bytes-per-uid",
            str(4 * size + 100),
            "--max-raw-bytes-total",
            str(64 * size),
        ],
        device=device,
    )
    small = write_dof(tmp_path, "small", code_dof().data)
    foreign = ForeignClients(shared, device)
    clients = Clients(tmp_path, device)
    try:
        hostile = foreign.start()
        victim = clients.start()
        answers = []
        for dof in dofs:
            answers.append(hostile.register(dof))
            assert "gen" in victim.register(small)  # others are never refused
        assert [("gen" in a) for a in answers] == [True] * 3 + [False] * 5, answers
        daemon.wait_for(
            "the quota line", lambda: "raw bytes of this process would be" in daemon.log_text()
        )
        second = foreign.start()
        assert "gen" in second.register(dofs[3])  # the user's 4th share
        assert "errno" in second.register(dofs[4])
        daemon.wait_for(
            "the quota line", lambda: "raw bytes of uid 65534 would be" in daemon.log_text()
        )
        assert "gen" in clients.start().register(dofs[5])  # root: its own share
        assert alive(daemon)
        daemon.verify()
    finally:
        clients.close()
        foreign.close()


# ------------------------------------------------------ row 4: the writer's memory


@contextlib.contextmanager
def _shared_argument_runs() -> Iterator[None]:
    """Let DOF built here reuse one string run for every probe's argument types (a
    hostile DOF does: 610 probes × 255 types of 127 bytes in 65 KB)."""
    import common.dof_build as dof_build

    original = dof_build._StrTab.add_run
    runs: dict[tuple[int, tuple[bytes, ...]], int] = {}

    def add_run(self: Any, strings: list[bytes]) -> int:
        key = (id(self), tuple(strings))
        if key not in runs:
            runs[key] = original(self, strings)
        return runs[key]

    dof_build._StrTab.add_run = add_run  # type: ignore[method-assign]
    try:
        yield
    finally:
        dof_build._StrTab.add_run = original  # type: ignore[method-assign]


def test_writer_returns_to_its_rest_size_after_a_hostile_request(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A 65 KB DOF whose records decode to ~20 MB (610 probes × 255 argument types
    of 127 bytes): afterwards the writer is back within 4 MiB of its rest size."""
    types: list[str | bytes] = [f"t{j:03d}" + "x" * 123 for j in range(255)]
    with _shared_argument_runs():
        probes = [
            ProbeSpec(f"f{i}", f"p{i}", [0x10], addr=CODE_ADDR + 0x100, native=types)
            for i in range(610)
        ]
        hostile_dof = build_dof([ProviderSpec("mem", probes)]).data
    assert len(hostile_dof) < 80_000
    daemon = daemon_factory.start()
    small = write_dof(tmp_path, "small", code_dof().data)
    big = write_dof(tmp_path, "hostile", hostile_dof)
    clients = Clients(tmp_path, daemon.device)
    try:
        victim = clients.start()
        assert victim.register(small)["gen"] == 0
        writer = daemon.writer_pid()
        rest = status_kib(writer, "VmRSS")
        hostile = clients.start()
        assert hostile.register(big)["gen"] == 0
        assert hostile.exit() == 0
        daemon.wait_for(
            "the hostile process pruned", lambda: hostile.pid not in daemon.stash_pids()
        )
        assert victim.register(small)["gen"] == 1  # the writer has finished its clean-up
        assert daemon.writer_pid() == writer
        after = status_kib(writer, "VmRSS")
        assert after - rest <= 4096, f"writer RSS {rest} KiB at rest, {after} KiB after"
        daemon.verify()
    finally:
        clients.close()


def test_hostile_helpers_work(shared: Path) -> None:
    """The foreign-user client really runs as that user (a check of this file's helper)."""
    foreign = ForeignClients(shared, shared / "no-device")
    try:
        client = foreign.start()
        assert uid_is(client.pid, HOSTILE_UID)
        assert client.register(write_dof(shared, "x", code_dof().data)).get("stage") == "open"
        wait_until("nothing", lambda: True)
    finally:
        foreign.close()


# ------------------------------------- a writer that breaks on requests is not fatal


def test_writer_breaking_on_requests_never_stops_the_daemon(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Seven registrations in a row whose writer dies in the middle of the commit (a
    hostile request could make it crash): each fails alone (EINVAL), nothing of it
    stays, and the daemon keeps serving — before, the fifth made it exit 2."""
    daemon = daemon_factory.start()
    small = write_dof(tmp_path, "small", code_dof().data)
    data = probes_dof(20000)
    bigs = [write_dof(tmp_path, f"big{i}", data) for i in range(7)]  # one mapping key each
    clients = Clients(tmp_path, daemon.device)
    try:
        client = clients.start()
        assert client.register(small)["gen"] == 0
        pdir = daemon.state_dir / "stash" / "dof-pid" / str(client.pid)
        (first,) = mapping_dirs(pdir)
        seen = {first}  # a killed commit's directory stays until the next writer recovers
        for big in bigs:
            client.send({"op": "register", "dof_file": str(big)}, answer=False)
            # the writer has begun this mapping (its directory exists, uncommitted)
            daemon.wait_for(
                "the commit to begin", partial(new_mapping, pdir, set(seen)), timeout=60
            )
            seen |= mapping_dirs(pdir)
            os.kill(daemon.writer_pid(), signal.SIGKILL)
            assert client.read().get("errno") == errno.EINVAL
            assert alive(daemon), daemon.log_text()
        assert client.register(small)["gen"] == 1  # nothing of the failed ones stayed
        assert mapping_dirs(pdir) == {first}
        assert alive(daemon)
        assert "failed 5 times in a row" not in daemon.log_text()
        daemon.verify()
    finally:
        clients.close()
