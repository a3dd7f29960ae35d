"""Hostile names are refused before any write; planted links and FIFOs are never followed."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from common.errors import StashError
from common.records import Eof, Err, Probe, Provider, ResultRecord, Tracepoint
from common.stash_protocol import StashQuotas
from dtprobed.stash.store import Stash
from tests.stash.support import (
    WORKED,
    Proc,
    many_records,
    records_for,
    registration,
    sleepers,
    snapshot,
)


@pytest.fixture
def proc() -> Iterator[Proc]:
    with sleepers(1) as (p,):
        yield p


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    outside = tmp_path / "outside"
    (outside / "victim").mkdir(parents=True)
    (outside / "victim" / "file").write_text("precious")
    (outside / "x").write_text("x")
    return tmp_path / "run", outside


def unchecked(cls: type, *values: object) -> ResultRecord:
    """Build a record the way a hostile peer's bytes would decode, bypassing nothing:
    msgspec validates on decode, so this goes through msgpack."""
    raw = msgspec.msgpack.encode([*values])
    record: ResultRecord = msgspec.msgpack.decode(raw, type=cls)
    return record


HOSTILE = ["../../x", "a/b", ".", "..", "x:y", "ctl\x01", "del\x7f", "", "nul\x00"]


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("field", ["provider", "mod", "fun", "prb"])
def test_hostile_names_cannot_even_decode(name: str, field: str) -> None:
    prv = name if field == "provider" else "p"
    with pytest.raises(msgspec.ValidationError):
        if field == "provider":
            unchecked(Provider, 0, prv, 1)
        else:
            values = {"mod": "m", "fun": "f", "prb": "p", field: name}
            unchecked(Probe, 1, values["mod"], values["fun"], values["prb"], 1, 0, 0)


def test_too_long_spec_is_refused_and_nothing_changes(dirs: tuple[Path, Path], proc: Proc) -> None:
    state, outside = dirs
    stash = Stash(str(state))
    stash.register(registration(proc.pid, proc.start_time, ino=1), WORKED)
    before, before_out = snapshot(str(state)), snapshot(str(outside))
    long: list[ResultRecord] = [Provider(name="p" * 63, nprobes=1)]
    long += [Probe(mod="m" * 63, fun="f" * 127, prb="q" * 63, ntp=1, nargc=0, xargc=0)]
    long += [Tracepoint(addr=1, is_enabled=False), Eof()]
    with pytest.raises(StashError) as err:
        stash.register(registration(proc.pid, proc.start_time, ino=2), long)
    assert err.value.errno == errno.EINVAL and "too long for a file name" in str(err.value)
    # a bad stream (count mismatch), an unfinished one and an ERR stream are refused alike
    unfinished = records_for("z", [("m", "f", "p", 1)])[:-1]
    for bad in ([*WORKED[:-2], Eof()], unfinished, [Err(errno=22, message="no")]):
        with pytest.raises(StashError):
            stash.register(registration(proc.pid, proc.start_time, ino=3), bad)
    # an exec'd process whose registration is refused triggers no exec pruning
    with pytest.raises(StashError):
        stash.register(registration(proc.pid, proc.start_time, ino=4, exec_ino=9), long)
    assert snapshot(str(state)) == before and snapshot(str(outside)) == before_out


def plant_symlink(state: Path, rel: str, target: Path) -> None:
    p = state / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.symlink_to(target)


@pytest.mark.parametrize(
    "plant",
    [
        "stash/dof/64768-99 -> victim/file",
        "stash/dof/64768-99 fifo",
        "stash/dof-pid/$PID -> victim",
        "probes/$PID -> victim",
        "probes/$PID/test_prov$PID -> victim",
        "probes/$PID/test_prov$PID/test/main/go -> victim/file",
        "probes/$PID/test_prov$PID/test/main/go fifo",
    ],
)
def test_planted_entries_are_refused_not_followed(
    dirs: tuple[Path, Path], proc: Proc, plant: str
) -> None:
    state, outside = dirs
    stash = Stash(str(state))
    if plant.startswith("probes/$PID/"):  # else start-up recovery drops probes/ of unknown pids
        stash.register(registration(proc.pid, proc.start_time, ino=1), many_records(1, "k"))
    stash.close()
    rel, _, what = plant.replace("$PID", str(proc.pid)).partition(" ")
    if what == "fifo":
        (state / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(state / rel)
    else:
        plant_symlink(state, rel, outside / what.removeprefix("-> "))
    before_out = snapshot(str(outside))
    before = snapshot(str(state))
    stash = Stash(str(state))
    with pytest.raises(StashError):
        stash.register(registration(proc.pid, proc.start_time), WORKED)
    assert snapshot(str(state)) == before  # all or nothing, even here
    assert stash.verify() != []  # the planted entry is reported
    for operation in (
        lambda: stash.remove_pid(proc.pid),
        stash.prune_dead,
        lambda: stash.reparse_scan(force=True),
    ):
        with contextlib.suppress(StashError):  # refusing is fine; following is not
            operation()
    stash.close()
    Stash(str(state)).close()  # recovery
    assert snapshot(str(outside)) == before_out
    assert (outside / "victim" / "file").read_text() == "precious"


@pytest.mark.parametrize(
    "plant",
    [
        "probes/$PID/k$PID -> victim",
        "probes/$PID/k$PID/a.out -> victim",
        "probes/$PID/k$PID/a.out/f0 -> victim",
        "probes/$PID/k$PID/a.out/f0/p1 -> victim/file",
        "probes/$PID/k$PID/a.out/f0/p1 dir",
        "parsed/k:a.out:f0:p1 dir",
        "parsed/k:x:..:p9 -> victim",
        # what remove_pid removes by name (no listing) unless it is not as written
        "mapping/raw dir",
        "mapping/dh -> victim",
        "mapping/parsed -> victim",
        "mapping/extra dir",
        "pid/next-gen dir",
        "pid/exec-mapping -> victim",
        "pid/extra dir",
    ],
)
def test_remove_pid_removes_everything_around_planted_entries_and_follows_none(
    dirs: tuple[Path, Path], proc: Proc, plant: str
) -> None:
    """remove_pid finds probes/ entries by the names of parsed/ files: a planted
    component on that path is neither followed nor left behind."""
    state, outside = dirs
    stash = Stash(str(state))
    stash.register(registration(proc.pid, proc.start_time, ino=1), many_records(3, "k"))
    mapping = state / f"stash/dof-pid/{proc.pid}/64768-1"
    rel, _, what = plant.replace("$PID", str(proc.pid)).partition(" ")
    if rel.startswith("parsed/"):
        target = mapping / rel
    elif rel.startswith(("mapping/", "pid/")):
        where, _, name = rel.partition("/")
        target = (mapping if where == "mapping" else mapping.parent) / name
    else:
        target = state / rel
    if target.is_dir() and not target.is_symlink():
        for item in sorted(target.rglob("*"), reverse=True):
            item.unlink() if not item.is_dir() else item.rmdir()
        target.rmdir()
    else:
        target.unlink(missing_ok=True)
    if what == "dir":
        (target / "inner").mkdir(parents=True)
    else:
        target.symlink_to(outside / what.removeprefix("-> "))
    before_out = snapshot(str(outside))
    stash.remove_pid(proc.pid)
    stash.close()
    assert snapshot(str(outside)) == before_out
    assert (outside / "victim" / "file").read_text() == "precious"
    assert not (state / f"probes/{proc.pid}").exists()
    assert not (state / f"stash/dof-pid/{proc.pid}").exists()


def test_planted_generation_symlink_is_not_followed(dirs: tuple[Path, Path], proc: Proc) -> None:
    state, outside = dirs
    stash = Stash(str(state))
    stash.register(registration(proc.pid, proc.start_time), WORKED)
    pdir = state / f"stash/dof-pid/{proc.pid}"
    (pdir / "5").symlink_to(outside / "victim")
    (pdir / "6").symlink_to("../../../../outside/x")
    before_out = snapshot(str(outside))
    stash.remove(proc.pid, 5)
    stash.remove(proc.pid, 6)
    stash.remove_pid(proc.pid)
    stash.close()
    Stash(str(state)).close()
    assert snapshot(str(outside)) == before_out
    assert not pdir.exists()


def test_state_dir_components_must_not_be_symlinks(dirs: tuple[Path, Path]) -> None:
    state, outside = dirs
    state.mkdir()
    (state / "stash").symlink_to(outside / "victim")
    with pytest.raises(OSError) as err:
        Stash(str(state))
    assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert sorted(os.listdir(outside / "victim")) == ["file"]


# ------------------------------------------------------------------ quotas


def test_quota_generations(tmp_path: Path, proc: Proc) -> None:
    stash = Stash(str(tmp_path), StashQuotas(max_generations=2))
    reg = registration(proc.pid, proc.start_time)
    stash.register(reg, WORKED)
    stash.register(reg, WORKED)
    before = snapshot(str(tmp_path))
    with pytest.raises(StashError) as err:
        stash.register(reg, WORKED)
    assert err.value.errno == errno.EDQUOT and "generations" in str(err.value)
    assert snapshot(str(tmp_path)) == before
    stash.remove(proc.pid, 0)
    assert stash.register(reg, WORKED) == 2  # room again


def test_quota_probes_per_process_and_total(tmp_path: Path) -> None:
    with sleepers(3) as (a, b, c):
        stash = Stash(str(tmp_path), StashQuotas(max_probes_per_pid=30, max_probes_total=50))
        stash.register(registration(a.pid, a.start_time, ino=1), many_records(20))
        before = snapshot(str(tmp_path))
        with pytest.raises(StashError) as err:
            stash.register(registration(a.pid, a.start_time, ino=2), many_records(11, "x"))
        assert err.value.errno == errno.EDQUOT and "probes of this process" in str(err.value)
        assert snapshot(str(tmp_path)) == before
        stash.register(registration(b.pid, b.start_time, ino=1), many_records(25))
        with pytest.raises(StashError) as err:
            stash.register(registration(c.pid, c.start_time, ino=1), many_records(6))
        assert err.value.errno == errno.EDQUOT and "in the stash" in str(err.value)
        stash.register(registration(c.pid, c.start_time, ino=1), many_records(5))
        # the counts survive a restart (rebuilt from the tree)
        stash.close()
        stash = Stash(str(tmp_path), StashQuotas(max_probes_per_pid=30, max_probes_total=50))
        with pytest.raises(StashError):
            stash.register(registration(c.pid, c.start_time, ino=2), many_records(1, "n"))
        stash.remove_pid(a.pid)
        stash.register(registration(c.pid, c.start_time, ino=2), many_records(1, "n"))
        assert stash.verify() == []


# ------------------------------------------------------------------ liveness


def test_prune_dead_uses_start_time(tmp_path: Path) -> None:
    with sleepers(4) as (alive, dead, reused, upstream):
        stash = Stash(str(tmp_path))
        stash.register(registration(alive.pid, alive.start_time), WORKED)
        stash.register(registration(dead.pid, dead.start_time), WORKED)
        # a live pid whose stored start time is an earlier process's: pid reuse
        stash.register(registration(reused.pid, reused.start_time + 5), WORKED)
        stash.register(registration(upstream.pid, upstream.start_time), WORKED)
        os.removexattr(tmp_path / f"stash/dof-pid/{upstream.pid}", "trusted.dtprobed.start_time")
        dead.popen.kill()
        dead.popen.wait()
        assert sorted(stash.prune_dead()) == sorted([dead.pid, reused.pid])
        left = sorted(os.listdir(tmp_path / "stash/dof-pid"))
        assert left == sorted([str(alive.pid), str(upstream.pid)])
        upstream.popen.kill()
        upstream.popen.wait()
        assert stash.prune_dead() == [upstream.pid]  # no xattr: kill(pid, 0) decides
        assert stash.verify() == []


@pytest.mark.parametrize("content", [b"", b"\0" * 3])
def test_planted_hard_link_at_next_gen_is_not_written_through(
    dirs: tuple[Path, Path], proc: Proc, content: bytes
) -> None:
    """next-gen is the one file rewritten in place: a second link must stop the write."""
    state, outside = dirs
    stash = Stash(str(state))
    stash.register(registration(proc.pid, proc.start_time), WORKED)
    victim = outside / "next-gen-victim"
    victim.write_bytes(content)
    next_gen = state / f"stash/dof-pid/{proc.pid}/next-gen"
    next_gen.unlink()
    os.link(victim, next_gen)
    before = snapshot(str(state))
    with pytest.raises(StashError) as info:
        stash.register(registration(proc.pid, proc.start_time, ino=5), WORKED)
    assert info.value.errno == errno.EMLINK
    assert "next-gen has 2 links" in str(info.value)
    assert victim.read_bytes() == content and victim.stat().st_nlink == 2
    assert snapshot(str(state)) == before
    problems = stash.verify()
    assert any("next-gen: link count 2, expected 1" in p for p in problems), problems
    stash.close()
    # recovery at start-up does not write through it either (needed: next-gen >= 1)
    Stash(str(state)).close()
    assert victim.read_bytes() == content


@pytest.mark.parametrize("path", ["exec-mapping", "64768-99/dh", "64768-99/parsed/version"])
def test_verify_reports_a_second_link_on_private_files(
    dirs: tuple[Path, Path], proc: Proc, path: str
) -> None:
    state, outside = dirs
    stash = Stash(str(state))
    stash.register(registration(proc.pid, proc.start_time), WORKED)
    assert stash.verify() == []
    os.link(state / f"stash/dof-pid/{proc.pid}/{path}", outside / "second")
    problems = stash.verify()
    assert any(f"{path}: link count 2, expected 1" in p for p in problems), problems
