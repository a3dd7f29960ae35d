"""The writer's log lines reach the daemon's log, over its pipe, bounded (docs/protocol.md).

The writer never writes a log itself: each line is a ``Log`` frame before a
reply (start-up recovery: before the first reply), which the host logs into
the daemon's ``dtprobed.stash`` logger.  DEBUG lines cross only with -d.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from common.framing import FrameDecoder
from common.grammar import check_stream
from common.stash_protocol import MAX_LOG_RECORDS, MAX_REPLY_FRAME, Log, StashReply
from dtprobed.children.writer import StashWriterChild
from dtprobed.stash.store import Stash
from dtprobed.stash.writer import PipeLogHandler
from tests.stash.support import Proc, records_for, registration, sleepers
from tests.support.daemon import finish, start_daemon


def _plant_interrupted(state: Path, p: Proc, count: int = 1) -> None:
    """A committed mapping, and *count* more written but not committed (killed before the symlink)."""
    stash = Stash(str(state))
    stash.register(registration(p.pid, p.start_time, ino=1), records_for("k", [("m", "f", "a", 1)]))
    for i in range(count):
        stash.register(
            registration(p.pid, p.start_time, ino=100 + i), records_for("u", [("m", "f", "b", 1)])
        )
        os.unlink(state / f"stash/dof-pid/{p.pid}/{i + 1}")
    stash.close()


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dtprobed.stash"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("debug", [False, True])
def test_recovery_and_debug_lines_reach_the_host_logger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, debug: bool
) -> None:
    state = tmp_path / "run"
    log = logging.getLogger("dtprobed.stash")
    caplog.set_level(logging.DEBUG if debug else logging.INFO, logger="dtprobed.stash")
    with sleepers(2) as (p, gone):
        _plant_interrupted(state, p)
        writer = StashWriterChild(str(state), timeout=30, log=log)
        try:
            # start-up recovery lines come before the first reply
            assert writer.verify() == []
            wanted = f"stash recovery: PID {p.pid}: rolled back uncommitted mapping 64768-100"
            lines = [r for r in _records(caplog) if wanted in r.getMessage()]
            assert len(lines) == 1 and lines[0].levelno == logging.INFO, _records(caplog)
            assert f"stash writer {writer.pid}: " in lines[0].getMessage()
            # a DEBUG line of a command: only with debug on
            reg = registration(gone.pid, gone.start_time, ino=3)
            writer.register(reg, check_stream(records_for("g", [("m", "f", "c", 1)])).probes)
            gone.popen.kill()
            gone.popen.wait()
            assert writer.prune_dead() == [gone.pid]
            pruning = [
                r
                for r in _records(caplog)
                if f"pruning dead/execed PID {gone.pid}" in r.getMessage()
            ]
            if debug:
                assert len(pruning) == 1 and pruning[0].levelno == logging.DEBUG
            else:
                assert pruning == []
        finally:
            writer.stop()


@pytest.mark.timeout(60)
def test_recovery_lines_are_summarised_and_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A start-up with 3 × MAX recovery actions logs some of them and a count of all;
    within the per-command bound; the writer works."""
    state = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="dtprobed.stash")
    with sleepers(1) as (p,):
        _plant_interrupted(state, p, count=3 * MAX_LOG_RECORDS)
        writer = StashWriterChild(str(state), timeout=60, log=logging.getLogger("dtprobed.stash"))
        try:
            assert writer.verify() == []
            lines = [r.getMessage() for r in _records(caplog) if "stash writer" in r.getMessage()]
            assert len(lines) <= MAX_LOG_RECORDS + 1, lines
            rolled = [ln for ln in lines if "rolled back uncommitted mapping" in ln]
            assert 0 < len(rolled) < 3 * MAX_LOG_RECORDS
            (summary,) = [ln for ln in lines if "more actions (" in ln]
            assert f"more actions ({3 * MAX_LOG_RECORDS} in all)" in summary, summary
            assert writer.verify() == []  # the same writer: not killed for it
        finally:
            writer.stop()


def test_log_frames_are_bounded_per_command() -> None:
    """3 × MAX lines in one command: MAX frames, then one "suppressed" note, then none."""
    r, w = os.pipe()
    try:
        handler = PipeLogHandler(w)
        logger = logging.getLogger("test.pipe_bound")
        logger.propagate = False
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        for i in range(3 * MAX_LOG_RECORDS):
            logger.info("line %d", i)
        os.close(w)
        w = -1
        data = b""
        while chunk := os.read(r, 1 << 16):
            data += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    decoder: FrameDecoder[StashReply] = FrameDecoder(StashReply, MAX_REPLY_FRAME)
    frames, used = decoder.split(bytearray(data))
    assert used == len(data)
    assert len(frames) == MAX_LOG_RECORDS + 1
    last = frames[-1]
    assert isinstance(last, Log) and "further log lines of this command suppressed" in last.message


@pytest.mark.timeout(120)
@pytest.mark.parametrize("debug", [False, True])
def test_recovery_line_appears_in_a_real_daemons_log(tmp_path: Path, debug: bool) -> None:
    state = tmp_path / "run"
    with sleepers(1) as (p,):
        _plant_interrupted(state, p)
        handle = start_daemon(tmp_path, state_dir=state, debug=debug)
        try:
            wanted = f"stash recovery: PID {p.pid}: rolled back uncommitted mapping 64768-100"
            handle.wait_for("the writer's recovery line", lambda: wanted in handle.log_text())
            (line,) = [ln for ln in handle.log_text().splitlines() if wanted in ln]
            # written by the daemon's own handler, through its dtprobed.stash logger
            assert f"dtprobed[{handle.pid}] INFO: stash writer " in line, line
            handle.verify()
        finally:
            finish(handle)
