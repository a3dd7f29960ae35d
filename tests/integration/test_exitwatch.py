"""The exit watcher with real processes and pidfds."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from dtprobed.daemon.exitwatch import ExitWatcher


def test_stop_during_a_long_prune_ends_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() may give up waiting for a prune that takes longer than its timeout;
    the watcher thread must then end on its own, without an exception (it used to
    poll the epoll that stop() had closed: ValueError in the thread)."""
    failures: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    entered, release = threading.Event(), threading.Event()

    def slow_prune(pid: int) -> None:
        entered.set()
        release.wait(30)

    watcher = ExitWatcher(slow_prune)
    watcher.start()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert watcher.watch_pid(proc.pid)
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
        assert entered.wait(30), "the exit was never seen"
        watcher.stop(join_timeout=0.1)  # the prune is still running
        release.set()
        deadline = time.monotonic() + 30
        while watcher._thread.is_alive():
            assert time.monotonic() < deadline, "the watcher thread never ended"
            time.sleep(0.01)
        assert failures == []
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
