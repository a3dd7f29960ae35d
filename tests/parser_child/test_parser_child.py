"""The real parser child over real pipes under its real seccomp filter, driven by ParserChild.

Also: raw frames to ``python -m parserd`` (garbage must make it exit, not
answer), and hostile fake parsers (``hostile_parser.py``) whose every lie must
end in ChildFailed — never in data handed to the caller.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper, many_probes_dof
from common.errors import ChildFailed, ChildTimeout, RequestRejected, SandboxViolation
from common.framing import MAX_RECORD_FRAME, FrameDecoder, FrameEncoder
from common.grammar import check_stream
from common.limits import ParseLimits
from common.records import Eof, Err, Log, ParserRecord
from common.requests import ParseRequest
from dtprobed.children.parser import _CPU_CHECK_EVERY, ParserChild
from parserd.dof_parse import parse_dof

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "fuzz" / "corpus"
HELPER = build_helper()
LOGGER = "test.parser_child"


def _variety() -> list[tuple[bytes, bytes]]:
    """(helper, dof) pairs covering every record kind, several providers, v2/v3, relocations."""
    args = ProbeSpec(
        "fn", "args", [0x20, 0x10], enoffsets=[0x30, 0x8], native=["int", "char *"],
        xlat=["long", "int", "long"], argmap=[1, 0, 1],
    )  # fmt: skip
    plain = ProbeSpec("fn", "plain", [4])
    return [
        (HELPER, build_dof([ProviderSpec("one", [plain])]).data),
        (build_helper("libfoo.so", 0x7F0000000000), build_dof([ProviderSpec("v3", [args, plain], relocate=True)]).data),
        (HELPER, build_dof([ProviderSpec("a", [plain]), ProviderSpec("b", [args])], version=2).data),
        (HELPER, many_probes_dof(300).data),
        ((CORPUS / "libusdt-3probes.dh").read_bytes(), (CORPUS / "libusdt-3probes.dof").read_bytes()),
    ]  # fmt: skip


def _wait_gone(pid: int) -> None:
    """The child was reaped by ParserChild: the pid no longer exists as our child."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@pytest.fixture
def child(caplog: pytest.LogCaptureFixture) -> Iterator[ParserChild]:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    pc = ParserChild(limits=ParseLimits(), timeout=10, log=logging.getLogger(LOGGER))
    try:
        yield pc
    finally:
        pc.stop()
    assert pc.pid is None


def test_round_trip_equals_in_process_parse(child: ParserChild) -> None:
    for helper, dof in _variety():
        expected = parse_dof(helper, dof, ParseLimits())
        assert isinstance(expected[-1], Eof), expected[-1]
        assert child.parse_records(helper, dof) == expected
        assert child.parse(helper, dof) == check_stream(expected).probes


def test_start_up_log_line_reaches_the_host_log(
    child: ParserChild, caplog: pytest.LogCaptureFixture
) -> None:
    child.start()
    child.parse(*_variety()[0])
    assert any("parser: parser ready: seccomp filter loaded" in r.message for r in caplog.records)


def test_rejected_dof_raises_request_rejected_with_the_parsers_error(child: ParserChild) -> None:
    dof = bytearray(_variety()[0][1])
    dof[0] = ord("X")
    expected = parse_dof(HELPER, bytes(dof))
    assert len(expected) == 1 and isinstance(expected[0], Err)
    with pytest.raises(RequestRejected) as info:
        child.parse(HELPER, bytes(dof))
    assert (info.value.errno, info.value.reason) == (expected[0].errno, expected[0].message)
    assert child.parse_records(HELPER, bytes(dof)) == expected


def test_oversized_dof_is_refused_before_it_is_sent() -> None:
    limits = ParseLimits(max_dof_size=1024)
    pc = ParserChild(limits=limits, timeout=10)
    try:
        dof = many_probes_dof(40).data
        assert pc.parse_records(HELPER, dof) == parse_dof(HELPER, dof, limits)
        assert pc.pid is None  # no child was needed
    finally:
        pc.stop()


def test_many_requests_in_a_row_use_one_child(child: ParserChild) -> None:
    cases = _variety()
    child.start()
    pid = child.pid
    for i in range(150):
        helper, dof = cases[i % len(cases)]
        if i % 3 == 0:
            with pytest.raises(RequestRejected):
                child.parse(helper, dof[:-1])  # loadsz no longer matches the data size
        else:
            assert child.parse(helper, dof)
    assert child.pid == pid


def test_scheduled_restart_after_n_requests(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    pc = ParserChild(
        limits=ParseLimits(), timeout=10, restart_after_requests=2, log=logging.getLogger(LOGGER)
    )
    helper, dof = _variety()[0]
    try:
        pids = []
        for _ in range(5):
            pc.parse(helper, dof)
            pids.append(pc.pid)
    finally:
        pc.stop()
    # after every second request the child is stopped; the next request starts a new one
    assert pids[1] is None and pids[3] is None
    assert None not in (pids[0], pids[2], pids[4]) and len({pids[0], pids[2], pids[4]}) == 3
    assert sum("scheduled restart after 2 requests" in r.message for r in caplog.records) == 2


def test_scheduled_restart_after_cpu_time(caplog: pytest.LogCaptureFixture) -> None:
    """RLIMIT_CPU accumulates under the filter: the client retires a child that used its budget.

    The CPU time is read every _CPU_CHECK_EVERY requests (a /proc read each), so
    with a zero budget the child is retired exactly after that many requests.
    """
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    pc = ParserChild(
        limits=ParseLimits(), timeout=10, restart_after_cpu=0.0, log=logging.getLogger(LOGGER)
    )
    helper, dof = _variety()[0]
    try:
        first = _running_pid(pc)
        for i in range(_CPU_CHECK_EVERY):
            assert pc.pid == first, f"retired early, after {i} requests"
            pc.parse(helper, dof)
        assert pc.pid is None
        pc.parse(helper, dof)
        assert pc.pid not in (None, first)
    finally:
        pc.stop()
    assert (
        sum(
            "scheduled restart after" in r.message and "CPU seconds" in r.message
            for r in caplog.records
        )
        == 1
    )


def _running_pid(pc: ParserChild) -> int:
    pc.start()
    pid = pc.pid
    assert pid is not None
    return pid


@pytest.mark.parametrize(
    "garbage",
    [struct.pack("<I", 0xFFFFFFF0), struct.pack("<I", 0), struct.pack("<I", 5) + b"\xc1" * 5],
    ids=["oversized-length", "zero-length", "undecodable-body"],
)
def test_garbage_request_makes_the_child_exit_and_the_next_request_works(
    child: ParserChild, caplog: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    helper, dof = _variety()[0]
    child.parse(helper, dof)
    pid = _running_pid(child)
    running = child._child  # the test plays a broken host on the request pipe
    assert running is not None
    os.write(running.to_child, garbage)
    assert running.proc.wait(10) == 65  # EXIT_PROTOCOL, after a Log record saying why
    assert child.parse(helper, dof) == check_stream(parse_dof(helper, dof)).probes
    assert child.pid != pid
    text = "\n".join(r.message for r in caplog.records)
    assert "parser: bad request from the host, exiting" in text
    assert f"parser child {pid} closed its pipe between requests; it exited with status 65" in text


def test_raw_child_answers_frames_and_exits_on_a_bad_one() -> None:
    """The child driven without ParserChild: batches end in Eof/Err; garbage ends it with 65."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-m", "parserd"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    decoder: FrameDecoder[list[ParserRecord]] = FrameDecoder(list[ParserRecord], MAX_RECORD_FRAME)
    try:
        first = decoder.read(proc.stdout.read)
        assert len(first) == 1 and isinstance(first[0], Log)
        helper, dof = _variety()[3]
        proc.stdin.write(FrameEncoder().encode(ParseRequest(helper=helper, dof=dof)))
        proc.stdin.flush()
        records: list[ParserRecord] = []
        while not records or not isinstance(records[-1], Eof | Err):
            records += decoder.read(proc.stdout.read)
        assert records == parse_dof(helper, dof)
        proc.stdin.write(struct.pack("<I", 3) + b"\x93\x01\x02")  # a request missing its DOF
        proc.stdin.flush()
        (log,) = decoder.read(proc.stdout.read)
        assert isinstance(log, Log) and log.level == logging.ERROR and "bad request" in log.message
        assert proc.wait(10) == 65
        assert proc.stdout.read() == b""
    finally:
        proc.kill()
        proc.wait()


def test_eof_on_stdin_is_a_clean_exit() -> None:
    proc = subprocess.run(
        [sys.executable, "-I", "-m", "parserd"],
        input=b"",
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == b""
    assert FrameDecoder(list[ParserRecord], MAX_RECORD_FRAME).split(proc.stdout)[1] == len(
        proc.stdout
    )


def test_silent_child_times_out_is_killed_and_the_next_request_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    pc = ParserChild(limits=ParseLimits(), timeout=0.5, log=logging.getLogger(LOGGER))
    helper, dof = _variety()[0]
    try:
        pid = _running_pid(pc)
        os.kill(pid, signal.SIGSTOP)  # alive but silent
        with pytest.raises(
            ChildTimeout, match=re.escape("sent no answer within 0.5 s; it was killed by us")
        ):
            pc.parse(helper, dof)
        _wait_gone(pid)
        assert pc.pid is None
        assert pc.parse(helper, dof)
    finally:
        pc.stop()


def _kill_mid_request(pc: ParserChild, sig: signal.Signals) -> BaseException | None:
    """Stop the child, let a request reach its pipe, then deliver *sig*; returns what parse raised."""
    helper, dof = _variety()[3]
    pid = _running_pid(pc)
    running = pc._child
    assert running is not None
    os.kill(pid, signal.SIGSTOP)
    raised: list[BaseException | None] = [None]

    def request() -> None:
        try:
            pc.parse(helper, dof)
        except BaseException as err:
            raised[0] = err

    thread = threading.Thread(target=request)
    thread.start()
    # wait until the request is in the pipe, so the child dies *during* the exchange
    for _ in range(1000):
        pending = struct.unpack("i", fcntl.ioctl(running.to_child, termios.FIONREAD, b"\0" * 4))[0]
        if pending:
            break
        time.sleep(0.01)
    os.kill(pid, sig)
    os.kill(pid, signal.SIGCONT)
    thread.join(30)
    assert not thread.is_alive()
    _wait_gone(pid)
    return raised[0]


def test_child_killed_mid_request_fails_that_request_only(child: ParserChild) -> None:
    err = _kill_mid_request(child, signal.SIGKILL)
    assert type(err) is ChildFailed and "crashed with signal SIGKILL" in str(err)
    assert child.parse(*_variety()[0])


def test_child_dying_of_sigsys_is_a_sandbox_violation(child: ParserChild) -> None:
    err = _kill_mid_request(child, signal.SIGSYS)
    assert isinstance(err, SandboxViolation) and "killed by its seccomp filter" in str(err)
    assert child.parse(*_variety()[0])


def _hostile(mode: str, **limits: int) -> ParserChild:
    command = [sys.executable, str(Path(__file__).with_name("hostile_parser.py")), mode]
    return ParserChild(
        limits=ParseLimits(**limits), timeout=10, command=command, log=logging.getLogger(LOGGER)
    )


def test_hostile_control_honest_fake_is_believed() -> None:
    pc = _hostile("honest")
    try:
        (probe,) = pc.parse(*_variety()[0])
        assert probe.spec == "prov:mod:fun:p" and probe.tracepoints[0].addr == 16
        pc2 = _hostile("honest-err")
        with pytest.raises(RequestRejected):
            pc2.parse(*_variety()[0])
        pc2.stop()
    finally:
        pc.stop()


@pytest.mark.parametrize(
    "mode",
    [
        "wrong-grammar", "eof-missing-tracepoint", "bad-name", "colon-name", "bad-utf8",
        "unknown-tag", "extra-field", "negative-addr", "undecodable", "not-a-batch",
        "oversized-frame", "zero-length-frame", "records-after-eof", "frame-after-eof",
        "err-after-records", "duplicate-probe", "unsorted-tracepoints", "too-many-providers",
        "too-many-probes", "args-mismatch", "log-flood", "dies-mid-stream",
    ],
)  # fmt: skip
def test_hostile_parser_is_killed_and_nothing_is_returned(mode: str) -> None:
    pc = _hostile(mode, max_providers=2, max_probes=4)
    try:
        with pytest.raises(ChildFailed) as info:
            pc.parse(*_variety()[0])
        assert not isinstance(info.value, ChildTimeout)
        assert pc.pid is None  # killed and reaped
    finally:
        pc.stop()


def test_unprompted_record_between_requests_is_a_violation_and_the_child_is_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    pc = _hostile("unprompted-on-sigusr1")
    try:
        pc.parse(*_variety()[0])
        first = pc.pid
        running = pc._child
        assert first is not None and running is not None
        os.kill(first, signal.SIGUSR1)
        assert select.select([running.from_child], [], [], 30)[0]  # the record is waiting
        pc.parse(*_variety()[0])  # served by a fresh child
        assert pc.pid != first
        assert any("sent Eof between requests" in r.message for r in caplog.records)
    finally:
        pc.stop()


def test_repeated_failures_back_off_instead_of_restarting_in_a_tight_loop() -> None:
    pc = _hostile("dies-mid-stream")
    try:
        for _ in range(4):  # three free restarts, then the fourth failure schedules a pause
            with pytest.raises(ChildFailed, match="closed its pipe in the middle of a request"):
                pc.parse(*_variety()[0])
        with pytest.raises(ChildFailed, match="failed 4 times in a row; not restarting it"):
            pc.parse(*_variety()[0])
        assert pc.pid is None
    finally:
        pc.stop()


def test_bad_helper_size_is_a_caller_bug(child: ParserChild) -> None:
    with pytest.raises(ValueError, match="80 bytes"):
        child.parse(b"short", b"")
    assert errno.EINVAL  # (the caller, not the child, is at fault: no child was touched)
    assert child.pid is None


def test_meanwhile_runs_during_the_parse_and_its_error_keeps_the_child_in_step() -> None:
    pc = ParserChild(limits=ParseLimits(), timeout=10)
    helper, dof = _variety()[0]
    seen: list[int | None] = []
    try:
        expected = pc.parse(helper, dof)
        pid = pc.pid
        assert pc.parse(helper, dof, meanwhile=lambda: seen.append(pc.pid)) == expected
        assert seen == [pid]

        def fails() -> None:
            raise RequestRejected(errno.ESRCH, "caller vanished")

        with pytest.raises(RequestRejected, match="caller vanished"):
            pc.parse(helper, dof, meanwhile=fails)
        # the answer to that request was consumed: the same child answers the next one
        assert pc.parse(helper, dof) == expected
        assert pc.pid == pid
    finally:
        pc.stop()


def test_a_slow_parse_that_reports_progress_outlives_the_timeout_a_silent_one_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """-t bounds how long the child may go *silent*, not how long a request may take."""
    timeout = 0.6
    monkeypatch.setenv("HOSTILE_PAUSE", str(timeout / 3))  # 8 pauses: > 2 timeouts in all
    command = [sys.executable, str(Path(__file__).with_name("hostile_parser.py"))]
    slow = ParserChild(limits=ParseLimits(), timeout=timeout, command=[*command, "slow-progress"])
    silent = ParserChild(limits=ParseLimits(), timeout=timeout, command=[*command, "slow-silent"])
    try:
        (probe,) = slow.parse(*_variety()[0])
        assert probe.spec == "prov:mod:fun:p"
        with pytest.raises(ChildTimeout, match="sent no answer"):
            silent.parse(*_variety()[0])
    finally:
        slow.stop()
        silent.stop()


def test_timeouts_do_not_make_the_parser_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow request is its sender's fault: after many timeouts in a row the next
    request still gets a fresh child at once (crashes do back off: see above)."""
    monkeypatch.setenv("HOSTILE_PAUSE", "0.1")
    command = [sys.executable, str(Path(__file__).with_name("hostile_parser.py")), "slow-silent"]
    pc = ParserChild(limits=ParseLimits(), timeout=0.2, command=command)
    try:
        for _ in range(6):  # FREE_RESTARTS is 3: crashes would back off from the 4th
            with pytest.raises(ChildTimeout, match=re.escape("sent no answer within 0.2 s")):
                pc.parse(*_variety()[0])
    finally:
        pc.stop()
