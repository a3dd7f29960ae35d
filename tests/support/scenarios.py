"""Helper-device scenarios shared by the CUSE (real kernel, in the VM) and FUSE runs.

Each scenario is one function ``scenario_*(env, kind)``: it drives real client
processes (``kind``: the C or the Python client of tests/realkernel/harness.py)
against the private daemon in ``env`` and asserts on what the clients see and on
the stash tree.  The same function runs in every device mode, so the modes can't
drift; where the kernel makes a mode differ (REMOVE never reaches a FUSE-file
daemon: the kernel answers EFAULT), the scenario asserts the documented behaviour of
that mode.  To run them in another suite: build a :class:`ScenarioEnv` around a
started ``PrivateDaemon`` (see tests/realkernel/guest/test_cuse.py) and call them.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.dof_abi import DOF_HDR, DOF_SEC
from common.dof_build import many_probes_dof
from tests.realkernel.harness import (
    ClientKind,
    ClientProcess,
    PrivateDaemon,
    padded_dof,
    probes_dof,
    spawn_with_pid,
    wait_until,
)

CHUNK = 65536  # the CUSE ioctl-retry chunk


@dataclass
class ScenarioEnv:
    daemon: PrivateDaemon  # started
    tmp: Path
    clients: list[ClientProcess] = field(default_factory=list)

    @property
    def mode(self) -> str:
        served = self.daemon.served_as()
        assert served is not None, "the daemon serves no device"
        return served

    def dof_file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def client(self, kind: ClientKind, dof_file: Path) -> ClientProcess:
        client = ClientProcess(kind, self.daemon.device, dof_file)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.finish()
        self.clients.clear()


# --- the stash, read directly (layout: reference §4.1) ------------------------------


def pid_dir(state_dir: Path, pid: int) -> Path:
    return state_dir / "stash" / "dof-pid" / str(pid)


def generations(state_dir: Path, pid: int) -> dict[int, str]:
    """gen -> "$dev-$ino" for every generation symlink of *pid*."""
    d = pid_dir(state_dir, pid)
    if not d.is_dir():
        return {}
    return {int(e.name): os.readlink(e) for e in d.iterdir() if e.name.isdigit() and e.is_symlink()}


def probe_names(state_dir: Path, pid: int) -> set[str]:
    """ "prv:mod:fun:prb" for every probe link under probes/$pid (provider without the pid)."""
    root = state_dir / "probes" / str(pid)
    if not root.is_dir():
        return set()
    return {
        ":".join([p.parts[-4].removesuffix(str(pid)), *p.parts[-3:]]) for p in root.glob("*/*/*/*")
    }


def raw_dof(state_dir: Path, pid: int, gen: int) -> bytes:
    """The DOF bytes stashed for (*pid*, *gen*), without the raw file's 8-byte base."""
    key = generations(state_dir, pid)[gen]
    return (pid_dir(state_dir, pid) / key / "raw").read_bytes()[8:]


def tree(state_dir: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry under *state_dir*: kind and content (file bytes, link target)."""
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(state_dir):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(state_dir))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path).encode())
            elif path.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", path.read_bytes())
    return out


def expected_probes(provider: str, nprobes: int, mod: str) -> set[str]:
    return {f"{provider}:{mod}:fn{i}:probe{i}" for i in range(nprobes)}


def wait_pruned(env: ScenarioEnv, pid: int) -> None:
    state = env.daemon.state_dir
    wait_until(lambda: not pid_dir(state, pid).exists(), f"pid {pid} pruned from the stash")


# --- scenarios --------------------------------------------------------------------


def scenario_register_and_remove(env: ScenarioEnv, kind: ClientKind) -> None:
    """ADDDOF through the full retry sequence; REMOVE deletes exactly that generation."""
    state = env.daemon.state_dir
    client = env.client(kind, env.dof_file("three.dof", probes_dof("three")))
    client.open()
    assert client.add("mod") == (0, 0)
    assert client.add("mod") == (1, 0)  # same mapping again: a new generation
    assert set(generations(state, client.pid)) == {0, 1}
    assert probe_names(state, client.pid) == expected_probes("three", 3, "mod")
    before = tree(state)

    if env.mode == "fuse":
        # The kernel's restricted ioctl can't pass an argument by value: EFAULT, and
        # the daemon never sees the request.
        assert client.remove(0) == (-1, errno.EFAULT)
        assert tree(state) == before
        client.finish()
        wait_pruned(env, client.pid)
        return

    assert client.remove(0) == (0, 0)
    assert set(generations(state, client.pid)) == {1}  # only generation 0 went
    assert probe_names(state, client.pid) == expected_probes("three", 3, "mod")
    after_first = tree(state)
    assert client.remove(7) == (0, 0)  # unknown generation: not an error
    assert tree(state) == after_first
    assert client.remove(1) == (0, 0)
    # the last mapping went, so the process's directory (and next-gen) went too
    # (reference §4.5 step 8): the next registration starts again at 0
    assert not pid_dir(state, client.pid).exists()
    assert probe_names(state, client.pid) == set()
    assert client.add("mod") == (0, 0)
    client.finish()
    wait_pruned(env, client.pid)


def scenario_sizes(env: ScenarioEnv, kind: ClientKind) -> None:
    """DOF at and around the 64 KiB chunk and ~258 KiB arrive byte for byte."""
    state = env.daemon.state_dir
    cases: list[tuple[str, bytes, int]] = [
        (f"pad{size}", padded_dof(probes_dof("sized"), size, fill=size % 251), 3)
        for size in (CHUNK - 1, CHUNK, CHUNK + 1)
    ]
    # upstream's tst.manyprobes (~206 KiB), relocated (SETX per probe: 258 KiB): both
    # clients load their object's text where they like and relocate into it
    many = many_probes_dof(2000, relocate=True).data
    cases.append(("many", many, 2000))
    for name, dof, nprobes in cases:
        client = env.client(kind, env.dof_file(f"{name}.dof", dof))
        client.open()
        gen, err = client.add("sized")
        assert (gen, err) == (0, 0), f"{name} ({len(dof)} bytes)"
        assert raw_dof(state, client.pid, 0) == dof, f"{name}: stashed bytes differ"
        assert len(probe_names(state, client.pid)) == nprobes
        client.finish()
        wait_pruned(env, client.pid)


def scenario_concurrent(env: ScenarioEnv, kind: ClientKind, nclients: int = 4) -> None:
    """Several processes register multi-chunk DOF at once; none gets another's bytes."""
    state = env.daemon.state_dir
    dofs = [
        padded_dof(probes_dof(f"conc{i}"), 3 * CHUNK + 1000 * i, fill=i + 1)
        for i in range(nclients)
    ]
    clients = [env.client(kind, env.dof_file(f"conc{i}.dof", d)) for i, d in enumerate(dofs)]
    for client in clients:
        client.open()
    for client in clients:  # all ioctls in flight before the first answer is read
        client.send("add conc")
    for i, client in enumerate(clients):
        assert client.receive() == ["add", "0", "0"], f"client {i}"
    for i, client in enumerate(clients):
        assert raw_dof(state, client.pid, 0) == dofs[i], f"client {i}: bytes mixed up"
        assert probe_names(state, client.pid) == expected_probes(f"conc{i}", 3, "conc")
    for client in clients:
        client.finish()
        wait_pruned(env, client.pid)


def scenario_killed_mid_sequence_then_pid_reused(env: ScenarioEnv, kind: ClientKind) -> None:
    """A client whose fetch dies half-way, then is killed; a new client gets its pid.

    The DOF file is shorter than its header's loadsz, so the fetch of a later chunk
    faults: in CUSE mode the kernel fails the ioctl (EFAULT) after the daemon has served
    the first retries and never tells it, so the daemon is left mid-sequence for that
    thread id.  A new process with the same pid (and tid) must then register at its
    first try (upstream fails it once) and inherit nothing.
    """
    state = env.daemon.state_dir
    full = padded_dof(probes_dof("cut"), 3 * CHUNK)
    broken = env.client(kind, env.dof_file("cut.dof", full[: CHUNK + CHUNK // 2]))
    broken.open()
    gen, err = broken.add("cut")
    assert gen == -1
    assert err in ((errno.EFAULT,) if env.mode == "cuse" else (errno.EFAULT, errno.EINVAL))
    assert not pid_dir(state, broken.pid).exists()
    pid = broken.pid
    broken.kill()

    fresh = spawn_with_pid(kind, env.daemon.device, env.dof_file("ok.dof", probes_dof("ok")), pid)
    env.clients.append(fresh)
    fresh.open()
    assert fresh.add("ok") == (0, 0)
    assert probe_names(state, pid) == expected_probes("ok", 3, "ok")
    assert set(generations(state, pid)) == {0}
    fresh.finish()
    wait_pruned(env, pid)


def hostile_dofs() -> dict[str, bytes]:
    good = probes_dof("hostile")
    hdr = DOF_HDR.unpack_from(good)

    def patched(offset: int, data: bytes) -> bytes:
        return good[:offset] + data + good[offset + len(data) :]

    loadsz = DOF_HDR.offset("loadsz")
    first_section = hdr.secoff + DOF_SEC.offset("offset")
    return {
        "bad-magic": patched(0, b"\x7fELF"),
        "loadsz-below-header": patched(loadsz, (32).to_bytes(8, "little")),
        "loadsz-beyond-256MiB": patched(loadsz, (300 << 20).to_bytes(8, "little")),
        "section-out-of-bounds": patched(first_section, (1 << 40).to_bytes(8, "little")),
        # above any dofhp_addr (so never relocated) and outside user space
        "tracepoint-outside-own-code": probes_dof_at("hostile", 0xFFFF_FFFF_0000_0000),
    }


def probes_dof_at(provider: str, addr: int) -> bytes:
    from common.dof_build import ProbeSpec, ProviderSpec, build_dof

    probe = ProbeSpec(func="fn0", name="probe0", offsets=[0], addr=addr)
    return build_dof([ProviderSpec(provider, [probe])]).data


def scenario_hostile(env: ScenarioEnv, kind: ClientKind) -> None:
    """Hostile DOF: EINVAL (E2BIG for a size limit), and the state dir is byte-identical."""
    state = env.daemon.state_dir
    for name, dof in hostile_dofs().items():
        before = tree(state)
        client = env.client(kind, env.dof_file(f"{name}.dof", dof))
        client.open()
        gen, err = client.add("hostile")
        assert gen == -1, name
        assert err == errno.EINVAL or (name == "loadsz-beyond-256MiB" and err == errno.E2BIG), (
            f"{name}: errno {err}"
        )
        assert tree(state) == before, f"{name} left something behind"
        client.finish()
    # nothing advanced: a good registration still starts at generation 0
    client = env.client(kind, env.dof_file("good.dof", probes_dof("good")))
    client.open()
    assert client.add("good") == (0, 0)
    client.finish()
    wait_pruned(env, client.pid)


def scenario_restart_keeps_stash(env: ScenarioEnv, kind: ClientKind) -> None:
    """SIGTERM: exit 0 and the device disappears; a restart brings it back, stash intact."""
    state = env.daemon.state_dir
    mode = env.mode
    client = env.client(kind, env.dof_file("stay.dof", probes_dof("stay")))
    client.open()
    assert client.add("stay") == (0, 0)
    kept = (generations(state, client.pid), probe_names(state, client.pid))

    assert env.daemon.stop(signal.SIGTERM) == 0
    assert env.daemon.served_as() is None, "the device outlived its daemon"
    assert client.add("stay")[0] == -1  # the old open file is dead

    env.daemon.start()
    assert env.daemon.served_as() == mode
    assert (generations(state, client.pid), probe_names(state, client.pid)) == kept
    client.send("close")
    assert client.receive() == ["close", "OK"]
    client.open()
    assert client.add("stay") == (1, 0)
    client.finish()
    wait_pruned(env, client.pid)


def scenario_auto_mode(env: ScenarioEnv, kind: ClientKind, expected: str) -> None:
    """``--device-mode auto`` (the daemon in *env*) serves *expected* and registers."""
    assert env.daemon.served_as() == expected
    client = env.client(kind, env.dof_file("auto.dof", probes_dof("auto")))
    client.open()
    assert client.add("auto") == (0, 0)
    client.finish()
    wait_pruned(env, client.pid)


SCENARIOS: dict[str, Callable[[ScenarioEnv, ClientKind], None]] = {
    "register_and_remove": scenario_register_and_remove,
    "sizes": scenario_sizes,
    "concurrent": scenario_concurrent,
    "killed_mid_sequence_then_pid_reused": scenario_killed_mid_sequence_then_pid_reused,
    "hostile": scenario_hostile,
    "restart_keeps_stash": scenario_restart_keeps_stash,
}
