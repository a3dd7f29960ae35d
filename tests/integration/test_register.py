"""Registrations through the real FUSE helper device, checked against the stash."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from common.dof_abi import DOF_PROBE, DOF_SEC, DOF_SECT_PROBES
from common.dof_build import ProbeSpec, ProviderSpec, build_dof
from common.records import ArgsNative, Tracepoint
from tests.support.client import ANON_ADDR, CODE_ADDR, DATA_ADDR
from tests.support.clients import Clients, code_dof, dof_bytes, write_dof
from tests.support.daemon import DaemonFactory, DaemonHandle
from tests.support.stash_view import file_key, generations, probe_files, snapshot

pytestmark = pytest.mark.timeout(120)

FIXTURES = Path(__file__).resolve().parents[1] / "support" / "fixtures"


def _tracepoints(index: int) -> list[Tracepoint]:
    base = CODE_ADDR + 0x100 * (index + 1)
    return [
        Tracepoint(addr=base + 0x10, is_enabled=False),
        Tracepoint(addr=base + 0x20, is_enabled=False),
    ]


def test_register_one_provider(daemon: DaemonHandle, clients: Clients, tmp_path: Path) -> None:
    dof = write_dof(tmp_path, "one", code_dof(nargs=2).data)
    client = clients.start()
    answer = client.register(dof, mod="prog")
    assert answer["gen"] == 0, answer
    key = file_key(dof)
    assert generations(daemon.state_dir, client.pid) == {0: key}
    files = probe_files(daemon.state_dir, client.pid)
    assert sorted(files) == ["testprov:prog:main:done", "testprov:prog:main:go"]
    go = files["testprov:prog:main:go"]
    assert go.provider.name == "testprov" and go.provider.nprobes == 2
    assert (go.probe.mod, go.probe.fun, go.probe.prb, go.probe.ntp) == ("prog", "main", "go", 2)
    assert go.args == [ArgsNative(args=["int", "char *"])]
    assert go.tracepoints == _tracepoints(0)
    assert files["testprov:prog:main:done"].tracepoints == _tracepoints(1)
    raw = daemon.state_dir / "stash" / "dof-pid" / str(client.pid) / key / "raw"
    assert raw.read_bytes()[8:] == dof_bytes(dof)  # 8-byte base prefix, then the DOF
    daemon.verify()
    # the client has its answer before the daemon writes the log line
    daemon.wait_for("the log line", lambda: "registered generation 0" in daemon.log_text())


def test_several_providers_and_generations(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    dofs = [
        write_dof(tmp_path, "a", code_dof({"pa": [("f", "p1")], "pb": [("g", "p2")]}).data),
        write_dof(tmp_path, "b", code_dof({"pc": [("h", "p3")]}).data),
        write_dof(tmp_path, "c", code_dof({"pd": [("i", "p4"), ("i", "p5")]}).data),
    ]
    client = clients.start()
    gens = [client.register(d, mod="lib")["gen"] for d in dofs]
    assert gens == [0, 1, 2]
    assert generations(daemon.state_dir, client.pid) == {i: file_key(d) for i, d in enumerate(dofs)}
    assert sorted(probe_files(daemon.state_dir, client.pid)) == [
        "pa:lib:f:p1",
        "pb:lib:g:p2",
        "pc:lib:h:p3",
        "pd:lib:i:p4",
        "pd:lib:i:p5",
    ]
    daemon.verify()


def test_same_mapping_twice_gets_a_new_generation(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    dof = write_dof(tmp_path, "twice", code_dof().data)
    client = clients.start()
    assert client.register(dof)["gen"] == 0
    assert client.register(dof)["gen"] == 1
    key = file_key(dof)
    assert generations(daemon.state_dir, client.pid) == {0: key, 1: key}
    daemon.verify()


def test_remove_in_fuse_mode_is_efault_and_pruning_covers_it(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    dof = write_dof(tmp_path, "rm", code_dof().data)
    client = clients.start()
    assert client.register(dof)["gen"] == 0
    before = snapshot(daemon.state_dir)
    # The generation goes by value; the kernel's restricted FUSE ioctl faults on it.
    assert client.send({"op": "remove", "gen": 0}) == {"errno": errno.EFAULT}
    assert snapshot(daemon.state_dir) == before
    assert client.exit() == 0
    daemon.wait_for("exit pruning", lambda: client.pid not in daemon.stash_pids())
    assert client.pid not in daemon.probe_pids()
    daemon.verify()


def _aimed_at(addr: int) -> bytes:
    return build_dof([ProviderSpec("evil", [ProbeSpec("f", "p", [0x10], addr=addr)])]).data


def test_tracepoint_outside_own_code_is_refused(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    client = clients.start()
    before = snapshot(daemon.state_dir)
    cases = {
        "unmapped": (_aimed_at(0x10_0000), {}),
        "file-backed, not executable": (_aimed_at(DATA_ADDR), {}),
        # DOF copied to anonymous memory at ANON_ADDR, tracepoint inside that copy
        "anonymous": (_aimed_at(ANON_ADDR + 8), {"anon": True}),
    }
    for what, (data, extra) in cases.items():
        answer = client.register(write_dof(tmp_path, what.split(",")[0], data), **extra)
        assert answer.get("errno") == errno.EINVAL, (what, answer)
    assert snapshot(daemon.state_dir) == before
    daemon.wait_for(
        "the refusals' log lines",
        lambda: "is not mapped" in daemon.log_text() and "not executable" in daemon.log_text(),
    )
    daemon.verify()


def test_dof_larger_than_64k(daemon: DaemonHandle, clients: Clients, tmp_path: Path) -> None:
    nprobes = 1000
    probes = [
        ProbeSpec(
            func=f"func_{i:05d}",
            name=f"probe_{i:05d}",
            offsets=[0x4],
            addr=CODE_ADDR + 0x20 * i,
            native=["int", "char *", "long"],
        )
        for i in range(nprobes)
    ]
    dof = build_dof([ProviderSpec("big", probes)])
    assert len(dof.data) > 64 * 1024
    path = write_dof(tmp_path, "big", dof.data)
    client = clients.start()
    assert client.register(path, mod="bigmod")["gen"] == 0
    files = probe_files(daemon.state_dir, client.pid)
    assert len(files) == nprobes
    last = files[f"big:bigmod:func_{nprobes - 1:05d}:probe_{nprobes - 1:05d}"]
    assert last.tracepoints == [
        Tracepoint(addr=CODE_ADDR + 0x20 * (nprobes - 1) + 4, is_enabled=False)
    ]
    daemon.verify()


def _libusdt_dof_aimed_at_code() -> bytes:
    """The libusdt fixture with each probe's ``dofpr_addr`` moved into the clients' text.

    libusdt points its probes at code it maps from an unlinked temporary file;
    our client's equivalent is its executable mapping at CODE_ADDR.
    """
    data = bytearray((FIXTURES / "libusdt-3probes.dof").read_bytes())
    secnum = int.from_bytes(data[28:32], "little")
    secoff = int.from_bytes(data[32:40], "little")
    for i in range(secnum):
        sec = DOF_SEC.unpack_from(data, secoff + i * DOF_SEC.size)
        if sec.type != DOF_SECT_PROBES:
            continue
        for j in range(sec.size // DOF_PROBE.size):
            at = sec.offset + j * DOF_PROBE.size
            data[at : at + 8] = (CODE_ADDR + 0x1000 * (j + 1)).to_bytes(8, "little")
    return bytes(data)


def test_libusdt_fixture_from_anonymous_memory(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    path = write_dof(tmp_path, "libusdt", _libusdt_dof_aimed_at_code())
    client = clients.start()
    answer = client.register(path, anon=True, helper_file=str(FIXTURES / "libusdt-3probes.dh"))
    assert answer["gen"] == 0, answer
    key = f"0-{answer['dof_addr']}"
    assert generations(daemon.state_dir, client.pid) == {0: key}
    files = probe_files(daemon.state_dir, client.pid)
    assert sorted(files) == [
        "feasprov:feasmod:func1:done",
        "feasprov:feasmod:func1:start",
        "feasprov:feasmod:func2:event",
    ]
    # anonymous DOF is private to the process: nothing shared under stash/dof/
    assert not (daemon.state_dir / "stash" / "dof" / key).exists()
    daemon.verify()


def test_hostile_dof_changes_nothing(
    daemon: DaemonHandle, clients: Clients, tmp_path: Path
) -> None:
    good = code_dof().data
    bad_magic = b"\x7fBAD" + good[4:]
    sections_past_end = good[:28] + (0xFFFF).to_bytes(4, "little") + good[32:]  # dofh_secnum
    evil_name = code_dof({"../../etc": [("main", "go")]}).data
    colon_name = code_dof({"prov": [("ma:in", "go")]}).data
    client = clients.start()
    before = snapshot(daemon.state_dir)
    for i, data in enumerate([bad_magic, sections_past_end, evil_name, colon_name]):
        answer = client.register(write_dof(tmp_path, f"hostile{i}", data))
        assert answer.get("errno") == errno.EINVAL, (i, answer)
    assert snapshot(daemon.state_dir) == before
    assert client.register(write_dof(tmp_path, "fine", good))["gen"] == 0
    daemon.verify()


def test_a_quota_refusal_says_so(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """EDQUOT in the writer is logged as a quota refusal (not "I/O error"), the
    client gets EINVAL as upstream answers every failed registration, and the
    stash is unchanged."""
    daemon = daemon_factory.start(extra_args=["--max-probes-per-pid", "1"])
    clients = Clients(tmp_path, daemon.device)
    try:
        dof = write_dof(tmp_path, "two", code_dof(nargs=0).data)  # two probes
        client = clients.start()
        before = snapshot(daemon.state_dir)
        assert client.register(dof)["errno"] == errno.EINVAL
        assert snapshot(daemon.state_dir) == before
        # not just "quota": the test's own tmp_path (in the log) has that word in it
        daemon.wait_for(
            "the log line", lambda: "stash quota refused the registration" in daemon.log_text()
        )
        text = daemon.log_text()
        assert "stash quota refused the registration" in text
        assert "probes of this process would be 2, limit 1" in text
        assert "I/O error" not in text
    finally:
        clients.close()
