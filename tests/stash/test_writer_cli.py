"""The writer child over real pipes (hostile frames included) and the dtprobed-stash CLI."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import StashError
from common.framing import FrameDecoder
from common.grammar import check_stream
from common.stash_protocol import (
    MAX_REPLY_FRAME,
    Log,
    Progress,
    Started,
    StashQuotas,
    StashReply,
)
from dtprobed.children.writer import StashWriterChild
from dtprobed.cli.stash import main as cli_main
from dtprobed.stash.store import Stash
from tests.stash.support import (
    WORKED,
    Proc,
    many_records,
    parsed,
    records_for,
    registration,
    sleepers,
    snapshot,
)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    with sleepers(2) as p:
        yield p


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[StashWriterChild]:
    child = StashWriterChild(
        str(tmp_path / "run"), timeout=10, quotas=StashQuotas(max_generations=3)
    )
    child.start()
    yield child
    child.stop()


@pytest.mark.timeout(60)
def test_writer_operations(writer: StashWriterChild, procs: list[Proc], tmp_path: Path) -> None:
    a, b = procs
    reg = registration(a.pid, a.start_time)
    probes = check_stream(parsed(reg)).probes
    assert writer.register(reg, probes) == 0
    assert writer.register(reg, probes) == 1
    assert writer.register(registration(b.pid, b.start_time), check_stream(WORKED).probes) == 0
    assert writer.verify() == []
    before = snapshot(str(tmp_path / "run"))
    writer.register(reg, probes)
    with pytest.raises(StashError) as err:  # quota passed on the command line
        writer.register(reg, probes)
    assert err.value.errno == errno.EDQUOT
    writer.remove(a.pid, 2)
    after = snapshot(str(tmp_path / "run"))
    next_gen = f"stash/dof-pid/{a.pid}/next-gen"
    assert after.pop(next_gen)[2] == 3  # generation numbers are never reused
    before.pop(next_gen)
    assert after == before
    writer.remove(a.pid, 99)
    assert writer.reparse_scan(False) == []
    items = writer.reparse_scan(True)
    assert sorted(i.pid for i in items) == sorted([a.pid, b.pid])
    for item in items:
        writer.write_reparsed(item, check_stream(parsed(reg)).probes if item.pid == a.pid else None)
    assert writer.verify() == []
    b.popen.kill()
    b.popen.wait()
    assert writer.prune_dead() == [b.pid]
    writer.remove_pid(a.pid)
    assert os.listdir(tmp_path / "run/stash/dof-pid") == []


def _raw_writer(state: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dtprobed.stash.writer", "--state-dir", state],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _log_frames(out: bytes) -> list[Log]:
    decoder: FrameDecoder[StashReply] = FrameDecoder(StashReply, MAX_REPLY_FRAME)
    frames, used = decoder.split(bytearray(out))
    assert used == len(out)
    assert all(isinstance(f, Log | Progress | Started) for f in frames), frames
    return [f for f in frames if isinstance(f, Log)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "frame",
    [
        struct.pack("<I", 0xFFFFFFFF),  # length beyond the bound: refused before reading
        struct.pack("<I", 0),
        struct.pack("<I", 3) + b"\xc1\xc1\xc1",  # not msgpack
        struct.pack("<I", 2) + b"\x91\x63",  # unknown command tag 99
        struct.pack("<I", 4) + b"\x93\x02\x00\x00",  # Remove with pid 0
        struct.pack("<I", 10) + b"\x92\x01",  # truncated body
    ],
)
def test_hostile_frames_end_the_writer_and_change_nothing(tmp_path: Path, frame: bytes) -> None:
    state = str(tmp_path / "run")
    w = _raw_writer(state)
    out, err = w.communicate(frame, timeout=30)
    assert w.returncode == 3, err
    # the writer writes no log of its own: the line is a Log frame for the daemon
    assert err == b""
    logs = _log_frames(out)
    assert any(
        rec.level == logging.ERROR and "protocol violation" in rec.message for rec in logs
    ), logs
    assert snapshot(state + "/stash") == {"dof": ("dir", 0o755), "dof-pid": ("dir", 0o755)}


@pytest.mark.timeout(60)
def test_writer_dead_between_commands_is_reported_and_replaced(
    writer: StashWriterChild, procs: list[Proc], caplog: pytest.LogCaptureFixture
) -> None:
    """No command was in flight, so none fails: the next one goes to a new writer, logged.

    (A writer killed *during* a command fails that command alone, with
    WriterCommandFailed: tests/integration/test_supervision.py and
    tests/integration/test_hostile_stash.py make that deterministic.)
    """
    a = procs[0]
    dead = writer.pid
    child = writer._slot.child
    assert dead is not None and child is not None
    os.kill(dead, signal.SIGKILL)
    deadline = time.monotonic() + 10
    # dead, not yet reaped, and its answer pipe at EOF: a zombie's last file may be
    # released a moment after it shows "Z" (seen once in CI), and "between commands"
    # is the state in which the daemon can see that the writer is gone
    while _state(dead) not in ("Z", None) or not child.readable():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with caplog.at_level(logging.ERROR):
        assert writer.register(registration(a.pid, a.start_time), check_stream(WORKED).probes) == 0
    assert writer.pid not in (None, dead)
    assert any(
        f"stash writer {dead} died between commands; it crashed with signal SIGKILL" in r.message
        for r in caplog.records
    )


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------- CLI


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli_main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli(tmp_path: Path, procs: list[Proc], capsys: pytest.CaptureFixture[str]) -> None:
    from dtprobed.stash.store import Stash

    a, _ = procs
    state = str(tmp_path / "run")
    stash = Stash(state)
    assert run_cli(capsys, "-s", state, "list")[0] == 1  # nothing to show
    records = records_for("prov", [("m", "f", "p", 0x1000), ("m", "g", "q", 0x2000)], args=True)
    stash.register(registration(a.pid, a.start_time), records)
    code, out, _ = run_cli(capsys, "-s", state, "list")
    assert code == 0 and out.count("\n") == 1
    assert out.startswith(f"{a.pid}\t{os.readlink(f'/proc/{a.pid}/exe')}\t")
    assert "providers=prov\tprobes=2\ttracepoints=4" in out
    code, out, _ = run_cli(capsys, "-s", state, "list", "--json")
    (row,) = json.loads(out)["processes"]
    assert (row["pid"], row["providers"], row["probes"], row["tracepoints"]) == (
        a.pid,
        ["prov"],
        2,
        4,
    )
    code, out, _ = run_cli(capsys, "-s", state, "show", str(a.pid), "--json")
    doc = json.loads(out)
    (mapping,) = doc["mappings"]
    assert mapping["generations"] == [0] and mapping["parsed_version"] == 3
    probe = mapping["probes"][0]
    assert probe["args_native"] == ["int", "char *"] and probe["args_xlat"] == ["string"]
    assert probe["args_map"] == [1] and probe["tracepoints"][1] == {
        "addr": 0x1010,
        "is_enabled": True,
    }
    code, out, _ = run_cli(capsys, "-s", state, "show", str(a.pid))
    assert code == 0 and f"prov{a.pid}:m:f:p" in out and "is-enabled 0x1010" in out
    assert run_cli(capsys, "-s", state, "show", "1")[0] == 1
    assert run_cli(capsys, "-s", state, "verify") == (0, "stash is consistent\n", "")
    # break invariants: a parsed file with junk, an orphan, a lowered next-gen
    pdir = Path(state, f"stash/dof-pid/{a.pid}")
    (pdir / "64768-99/parsed/prov:m:f:p").write_bytes(b"junk")
    Path(state, "stash/dof/5-5").write_bytes(b"x")
    os.truncate(pdir / "next-gen", 0)
    code, out, _ = run_cli(capsys, "-s", state, "verify", "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["consistent"]
    text = "\n".join(doc["problems"])
    assert "parsed/prov:m:f:p: format invalid" in text
    assert "stash/dof/5-5 is used by no registration (orphan)" in text
    assert f"stash/dof-pid/{a.pid}/next-gen is 0, highest generation is 0" in text
    assert run_cli(capsys, "-s", state, "verify")[0] == 1


@pytest.mark.parametrize("argv", [[], ["frob"], ["show"], ["show", "x"], ["list", "--bogus"]])
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, *argv)[0] == 2


def test_cli_missing_state_dir_is_not_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "-s", str(tmp_path / "nope"), "list")[0] == 1


def test_cli_reader_going_away_ends_quietly(tmp_path: Path, procs: list[Proc]) -> None:
    """`dtprobed-stash show PID | head -1`: killed by SIGPIPE like any filter, no traceback."""
    p = procs[0]
    stash = Stash(str(tmp_path))
    stash.register(registration(p.pid, p.start_time), many_records(2000))  # ~10000 lines
    stash.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtprobed.cli.stash", "-s", str(tmp_path), "show", str(p.pid)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(60) == -signal.SIGPIPE
    assert first.startswith(f"PID {p.pid}".encode())
    assert stderr == b""
