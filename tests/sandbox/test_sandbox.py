"""The parser child's seccomp allowlist and lock, checked as data and in locked processes.

The golden filter text (``golden/filter-<arch>.pfc``) is the reviewed
``export_pfc()`` output of the production filter.  After a deliberate change to
``parserd/allowlist.py`` (or a libseccomp upgrade that changes the text),
regenerate it and review the diff:

    .venv/bin/python -c "from parserd.sandbox import build_filter; import sys; \\
        build_filter().export_pfc(sys.stdout)" > tests/sandbox/golden/filter-x86_64.pfc
"""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pyseccomp
import pytest

from parserd.allowlist import ALLOWLIST, DEBUG_EXTRA
from parserd.sandbox import DEBUG_ENV, DebugMode, build_filter, debug_mode_from_env

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / f"filter-{platform.machine()}.pfc"


def test_allowlist_is_sorted_and_every_entry_has_a_reason() -> None:
    names = [rule.syscall for rule in ALLOWLIST]
    assert names == sorted(names)
    for rule in ALLOWLIST + DEBUG_EXTRA:
        assert rule.why.strip(), rule.syscall
        assert rule.syscall == rule.syscall.strip().lower()


def test_every_syscall_resolves_on_this_arch() -> None:
    arch = pyseccomp.system_arch()
    for rule in ALLOWLIST + DEBUG_EXTRA:
        assert pyseccomp.resolve_syscall(arch, rule.syscall) >= 0, rule.syscall


def test_pins_read_fd0_write_fd1_and_no_exec_mappings() -> None:
    pins = {rule.syscall: rule.pins for rule in ALLOWLIST}
    assert [(p.arg, p.op, p.value) for p in pins["read"]] == [(0, "EQ", 0)]
    assert [(p.arg, p.op, p.value) for p in pins["write"]] == [(0, "EQ", 1)]
    for name in ("mmap", "mprotect"):
        assert [(p.arg, p.op, p.value, p.mask) for p in pins[name]] == [(2, "MASKED_EQ", 0, 4)]
    # nothing that opens, creates, signals or inspects a process is allowed
    forbidden = {"open", "openat", "socket", "execve", "clone", "clone3", "fork", "kill", "getpid",
                 "ptrace", "ioctl", "connect", "sendmsg", "process_vm_readv"}  # fmt: skip
    assert forbidden.isdisjoint(pins)


def _pfc(mode: DebugMode = DebugMode.OFF) -> str:
    with tempfile.TemporaryFile() as f:
        build_filter(mode).export_pfc(f)
        f.seek(0)
        return f.read().decode()


def test_filter_equals_reviewed_golden_text() -> None:
    assert GOLDEN.exists(), f"no golden filter for {platform.machine()}: see the module docstring"
    assert _pfc() == GOLDEN.read_text()


def test_debug_modes_change_only_the_default_action_and_stderr() -> None:
    assert "action KILL_PROCESS;" in _pfc()
    trap = _pfc(DebugMode.TRAP)
    assert "action TRAP;" in trap and "# invalid architecture action\naction KILL_PROCESS;" in trap
    assert "if ($a0.lo32 == 2)" in trap  # faulthandler may write to stderr
    assert "action LOG;" in _pfc(DebugMode.LOG)
    assert debug_mode_from_env({DEBUG_ENV: "trap"}) is DebugMode.TRAP
    assert debug_mode_from_env({}) is DebugMode.OFF


def _run(
    action: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tests.sandbox.locked_child", action],
        input=stdin, capture_output=True, cwd=REPO, timeout=30, env=env,
        check=False,
    )  # fmt: skip


def test_normal_workload_runs_under_the_filter() -> None:
    request = msgspec.msgpack.encode({"dof": bytes(300_000), "n": 7})
    proc = _run("workload", request)
    assert proc.returncode == 0, proc.stderr
    assert msgspec.msgpack.decode(proc.stdout) == {
        "got": msgspec.msgpack.decode(request),
        "ok": True,
    }


@pytest.mark.parametrize(
    "action",
    ["open", "socket", "write-unpinned-fd", "read-unpinned-fd", "getpid", "mmap-exec", "fork"],
)
def test_forbidden_syscall_kills_with_sigsys(action: str) -> None:
    proc = _run(action)
    assert proc.returncode == -signal.SIGSYS, (proc.returncode, proc.stderr)
    assert proc.stdout == b""


def test_trap_debug_mode_shows_the_python_line_of_a_forbidden_call() -> None:
    import os

    proc = _run("getpid", env=dict(os.environ, **{DEBUG_ENV: "trap"}))
    # TRAP lets the process go on (getpid "returns" -ENOSYS); faulthandler named the line.
    assert proc.returncode == 0, proc.stderr
    assert b"locked_child.py" in proc.stderr and b"in main" in proc.stderr
