"""Golden trees: for given registrations, the exact tree and bytes upstream's layout prescribes.

Set DTPROBED_UPDATE_GOLDEN=1 to rewrite tests/golden/stash/*.json (then review the diff).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dtprobed.stash.store import Stash
from tests.stash.support import (
    WORKED,
    Proc,
    dof_bytes,
    normalized,
    parsed,
    records_for,
    registration,
    sleepers,
    snapshot,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "stash"

# reference §4.4: the 143-byte parsed file for test_prov / test:main:go / tracepoint 0x401136
WORKED_BYTES = bytes.fromhex(
    "0300000000000000"
    "2200000000000000" "00000000" "00000000" "0100000000000000" "746573745f70726f7600"
    "3500000000000000" "01000000" "00000000" "0100000000000000" "0000000000000000"
    "0000000000000000" "74657374006d61696e00676f00"
    "3000000000000000" "02000000" "00000000" "3611400000000000" "00000000" + "00" * 20
)  # fmt: skip


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    with sleepers(2) as p:
        yield p


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "run"


def check_golden(name: str, root: Path, procs: list[Proc]) -> None:
    tree = normalized(snapshot(str(root)), {p.pid: f"$PID{i}" for i, p in enumerate(procs)})
    path = GOLDEN / f"{name}.json"
    if os.environ.get("DTPROBED_UPDATE_GOLDEN"):
        path.write_text(json.dumps(tree, indent=1, sort_keys=True) + "\n")
    expected = json.loads(path.read_text())
    assert tree == expected


def test_worked_example_tree_and_143_bytes(state: Path, procs: list[Proc]) -> None:
    a = procs[0]
    stash = Stash(str(state))
    assert stash.register(registration(a.pid, a.start_time), WORKED) == 0
    spec = state / f"stash/dof-pid/{a.pid}/64768-99/parsed/test_prov:test:main:go"
    assert spec.read_bytes() == WORKED_BYTES and len(WORKED_BYTES) == 143
    link = state / f"probes/{a.pid}/test_prov{a.pid}/test/main/go"
    assert link.stat().st_ino == spec.stat().st_ino
    assert (state / f"stash/dof-pid/{a.pid}/0").readlink() == Path("64768-99")
    assert (
        state / f"stash/dof-pid/{a.pid}/exec-mapping"
    ).read_bytes() == b"64768-1234"  # 2.0.7: no NUL
    assert (state / f"stash/dof-pid/{a.pid}/next-gen").stat().st_size == 1
    assert (state / "stash/dof/64768-99").read_bytes() == bytes(8) + dof_bytes()
    assert stash.verify() == []
    check_golden("worked_example", state, procs)


def test_args_and_two_providers(state: Path, procs: list[Proc]) -> None:
    a = procs[0]
    stash = Stash(str(state))
    records = records_for("p1", [("m", "f", "a", 0x1000), ("m", "g", "b", 0x2000)], args=True)
    records = records[:-1] + records_for("p2", [("m", "f", "c", 0x3000)])
    stash.register(registration(a.pid, a.start_time), records)
    assert stash.verify() == []
    check_golden("args_two_providers", state, procs)


def test_shared_library_then_one_removed(state: Path, procs: list[Proc]) -> None:
    a, b = procs
    stash = Stash(str(state))
    stash.register(registration(a.pid, a.start_time), WORKED)
    stash.register(registration(b.pid, b.start_time), WORKED)
    shared = state / "stash/dof/64768-99"
    assert shared.stat().st_nlink == 3
    assert (state / f"stash/dof-pid/{b.pid}/64768-99/raw").stat().st_ino == shared.stat().st_ino
    check_golden("shared_two_processes", state, procs)
    stash.remove_pid(a.pid)
    assert shared.stat().st_nlink == 2  # the refcount keeps the raw file for b
    assert stash.verify() == []
    check_golden("shared_one_removed", state, procs)
    stash.remove(b.pid, 0)
    assert snapshot(str(state / "stash")) == {
        "dof": ("dir", 0o755),
        "dof-pid": ("dir", 0o755),
    }
    assert os.listdir(state / "probes") == []


def test_differing_bytes_keep_a_private_raw(state: Path, procs: list[Proc]) -> None:
    a, b = procs
    stash = Stash(str(state))
    stash.register(registration(a.pid, a.start_time), WORKED)
    other = registration(b.pid, b.start_time, dof=dof_bytes("y"))  # same size, other bytes
    assert len(other.raw[0].data) == len(dof_bytes())
    stash.register(other, WORKED)
    assert (state / "stash/dof/64768-99").stat().st_nlink == 2
    private = state / f"stash/dof-pid/{b.pid}/64768-99/raw"
    assert private.stat().st_nlink == 1
    assert private.read_bytes() == bytes(8) + dof_bytes("y")
    assert (state / "stash/dof/64768-99").read_bytes() == bytes(8) + dof_bytes()
    assert stash.verify() == []
    check_golden("private_raw", state, procs)
    # the reparse of b reads b's own upload, never a's
    items = {i.pid: i for i in stash.reparse_scan(force=True)}
    assert items[b.pid].raw[0].data == dof_bytes("y")
    assert items[a.pid].raw[0].data == dof_bytes()


def test_anonymous_dof_is_never_shared(state: Path, procs: list[Proc]) -> None:
    a = procs[0]
    stash = Stash(str(state))
    stash.register(registration(a.pid, a.start_time, dev=0, ino=0x7F0000001000), WORKED)
    assert os.listdir(state / "stash/dof") == []
    key = f"0-{0x7F0000001000}"
    assert (state / f"stash/dof-pid/{a.pid}/{key}/raw").stat().st_nlink == 1
    assert stash.verify() == []
    check_golden("anonymous", state, procs)


def test_same_mapping_twice_keeps_the_first(state: Path, procs: list[Proc]) -> None:
    a = procs[0]
    stash = Stash(str(state))
    reg = registration(a.pid, a.start_time)
    assert stash.register(reg, WORKED) == 0
    assert stash.register(reg, WORKED) == 1
    pdir = state / f"stash/dof-pid/{a.pid}"
    assert (pdir / "0").readlink() == (pdir / "1").readlink() == Path("64768-99")
    check_golden("same_mapping_twice", state, procs)
    stash.remove(a.pid, 0)
    assert (state / f"probes/{a.pid}/test_prov{a.pid}/test/main/go").exists()
    assert stash.verify() == []
    assert stash.remove(a.pid, 7) is False  # unknown generation: success, nothing changes
    assert stash.remove(a.pid, 1) is True
    assert not pdir.exists() and not (state / f"probes/{a.pid}").exists()


@pytest.mark.parametrize(
    ("change", "kwargs"),
    [("other_binary", {"exec_ino": 4321}), ("same_binary", {"token": "tok2"})],
)
def test_exec_removes_earlier_generations(
    state: Path, procs: list[Proc], change: str, kwargs: dict[str, object]
) -> None:
    a = procs[0]
    stash = Stash(str(state))
    stash.register(registration(a.pid, a.start_time), WORKED)
    stash.register(registration(a.pid, a.start_time, ino=100), WORKED)
    after = registration(a.pid, a.start_time, ino=200, **kwargs)  # type: ignore[arg-type]
    assert stash.register(after, records_for("new", [("m", "f", "p", 0x10)])) == 0
    pdir = state / f"stash/dof-pid/{a.pid}"
    assert sorted(os.listdir(pdir)) == ["0", "64768-200", "exec-mapping", "next-gen"]
    assert not (state / f"probes/{a.pid}/test_prov{a.pid}").exists()
    assert stash.verify() == []
    check_golden(f"exec_{change}", state, procs)


def test_pid_reuse_removes_the_dead_process(state: Path, procs: list[Proc]) -> None:
    a = procs[0]
    stash = Stash(str(state))
    stash.register(registration(a.pid, a.start_time + 1), WORKED)  # an earlier process
    stash.register(registration(a.pid, a.start_time, ino=5), WORKED)
    assert sorted(os.listdir(state / f"stash/dof-pid/{a.pid}")) == [
        "0",
        "64768-5",
        "exec-mapping",
        "next-gen",
    ]
    assert (
        os.getxattr(state / f"stash/dof-pid/{a.pid}", "trusted.dtprobed.start_time")
        == str(a.start_time).encode()
    )


def test_forced_reparse_after_junk_is_byte_identical(state: Path, procs: list[Proc]) -> None:
    a, b = procs
    stash = Stash(str(state))
    reg_a = registration(a.pid, a.start_time)
    reg_b = registration(b.pid, b.start_time, ino=7, dof=dof_bytes("zz"))
    stash.register(reg_a, parsed(reg_a))
    stash.register(reg_b, parsed(reg_b))
    before = snapshot(str(state))
    for dirpath, _, files in os.walk(state / "stash/dof-pid"):
        if dirpath.endswith("parsed"):
            for f in files:
                Path(dirpath, f).write_bytes(b"junk" * 3)
    assert stash.verify() != []
    items = stash.reparse_scan(force=True)
    assert [(i.pid, i.ino) for i in items] == sorted([(a.pid, 99), (b.pid, 7)])
    for item in items:
        stash.write_reparsed(item, parsed(reg_a if item.pid == a.pid else reg_b))
    assert snapshot(str(state)) == before
    assert stash.verify() == []
    assert stash.reparse_scan(force=False) == []


def test_older_format_raw_is_reparsed(state: Path, procs: list[Proc]) -> None:
    """An upstream M-era stash: raw without the base prefix, parsed version 1, no xattrs."""
    a = procs[0]
    stash = Stash(str(state))
    reg = registration(a.pid, a.start_time)
    stash.register(reg, parsed(reg))
    before = snapshot(str(state))
    stash.close()
    pdir = state / f"stash/dof-pid/{a.pid}"
    for name in ("trusted.dtprobed.start_time", "trusted.dtprobed.exec_token"):
        os.removexattr(pdir, name)
    raw = state / "stash/dof/64768-99"
    raw.write_bytes(reg.raw[0].data)  # in place: every hard link sees the old format
    (pdir / "64768-99/parsed/version").write_bytes((1).to_bytes(8, "little"))
    stash = Stash(str(state))
    (item,) = stash.reparse_scan(force=False)
    assert item.legacy_raw and item.raw == reg.raw and item.helper == reg.helper
    stash.write_reparsed(item, parsed(reg))
    assert stash.verify() == []
    after = snapshot(str(state))
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {"stash/dof/64768-99", f"stash/dof-pid/{a.pid}/64768-99/raw"}
    assert stash.prune_dead() == []  # no xattr: kill(pid, 0) says alive


def test_failed_reparse_leaves_mapping_unparsed_and_others_alone(
    state: Path, procs: list[Proc]
) -> None:
    a = procs[0]
    stash = Stash(str(state))
    stash.register(registration(a.pid, a.start_time), WORKED)
    stash.register(registration(a.pid, a.start_time, ino=5), records_for("q", [("m", "f", "p", 1)]))
    item = next(i for i in stash.reparse_scan(force=True) if i.ino == 99)
    stash.write_reparsed(item, None)
    pdir = state / f"stash/dof-pid/{a.pid}"
    assert os.listdir(pdir / "64768-99/parsed") == []
    assert sorted(os.listdir(pdir)) == ["0", "1", "64768-5", "64768-99", "exec-mapping", "next-gen"]
    assert (state / f"probes/{a.pid}/q{a.pid}/m/f/p").exists()
    assert not (state / f"probes/{a.pid}/test_prov{a.pid}").exists()
    assert stash.verify() == []
    assert [i.ino for i in stash.reparse_scan(force=False)] == [99]


@pytest.mark.parametrize("content", [b"64768-1234", b"64768-1234\0"])
def test_exec_mapping_read_with_or_without_nul(
    state: Path, procs: list[Proc], content: bytes
) -> None:
    """2.0.7 writes no NUL, upstream's development tree one: both are the same executable."""
    a = procs[0]
    stash = Stash(str(state))
    stash.register(registration(a.pid, a.start_time), WORKED)
    em = state / f"stash/dof-pid/{a.pid}/exec-mapping"
    em.unlink()
    em.write_bytes(content)
    assert stash.verify() == []
    # same executable: the first generation stays (no exec detected)
    assert stash.register(registration(a.pid, a.start_time, ino=5), WORKED) == 1
    assert em.read_bytes() == content
    assert stash.verify() == []


@pytest.mark.parametrize("content", [b"64768\0-1234", b"64768-1234\0\0", b"x-1", b""])
def test_verify_reports_a_bad_exec_mapping(state: Path, procs: list[Proc], content: bytes) -> None:
    a = procs[0]
    stash = Stash(str(state))
    stash.register(registration(a.pid, a.start_time), WORKED)
    em = state / f"stash/dof-pid/{a.pid}/exec-mapping"
    em.unlink()
    em.write_bytes(content)
    assert any("exec-mapping" in p for p in stash.verify())
