"""Registered processes' lifetimes: one pidfd each, pruned from the stash as they exit.

Upstream prunes dead processes every 128 successful requests; we hold a pidfd
per registered process and prune as soon as it polls readable, from a
dedicated thread (``dtprobed-exits``) blocked in ``epoll_wait``.

Facts we rely on (pidfd_open(2)):

* a pidfd refers to one process, not a pid number, so a reused pid can't
  make an old pidfd fire for the new process, nor a new one for the old;
* it polls readable (``EPOLLIN``) once that process has exited (zombie or
  reaped), and stays readable;
* ``pidfd_open`` of a pid that is not a thread-group leader fails (EINVAL),
  which is why the receiver resolves thread ids first.

The one race that matters is pid reuse *between* an exit and our prune: a
new process with the same pid may register before the old exit is handled,
and pruning "pid N" afterwards would erase the new registration.  So the
registration path calls :meth:`ExitWatcher.settle` first: if the pid's old
pidfd says it is dead, the prune runs (or is waited for) before the new
registration goes to the writer.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from dtprobed.oslib.pidfd import pidfd_exited

log = logging.getLogger("dtprobed")


class ExitWatcher:
    """Owns one pidfd per watched process and calls ``on_exit(pid)`` once per exit.

    ``on_exit`` runs on the watcher thread (or on a registration thread via
    :meth:`settle`); it must not raise — exceptions are logged and dropped.
    """

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._pidfds: dict[int, int] = {}  # pid -> pidfd
        self._pids_by_fd: dict[int, int] = {}
        self._pruning: dict[int, threading.Event] = {}
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dtprobed-exits", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pidfds)

    def watched(self) -> list[int]:
        with self._lock:
            return sorted(self._pidfds)

    def watch(self, pid: int, pidfd: int) -> None:
        """Watch *pid* through *pidfd* (ownership passes to the watcher).

        If *pid* is already watched, the process is the same one (a live pid
        names one process), so the new fd is closed and the old one kept.
        """
        with self._lock:
            if self._stopping or pid in self._pidfds:
                os.close(pidfd)
                return
            self._pidfds[pid] = pidfd
            self._pids_by_fd[pidfd] = pid
            # Registered after the table update: an already-dead process fires at once.
            self._epoll.register(pidfd, select.EPOLLIN)

    def watch_pid(self, pid: int) -> bool:
        """Open a pidfd for *pid* and watch it; False if the process is gone."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        self.watch(pid, pidfd)
        return True

    def settle(self, pid: int) -> None:
        """Before registering *pid*: finish pruning an earlier, dead process of that pid."""
        with self._lock:
            event = self._pruning.get(pid)
            mine = False
            if event is None:
                pidfd = self._pidfds.get(pid)
                if pidfd is None or not pidfd_exited(pidfd):
                    return
                event = self._claim(pid, pidfd)
                mine = True
        if mine:
            self._prune(pid, event)
        else:
            event.wait()

    def _claim(self, pid: int, pidfd: int) -> threading.Event:
        """Take *pid* out of the table (lock held); the claimer must call :meth:`_prune`."""
        del self._pidfds[pid]
        del self._pids_by_fd[pidfd]
        self._epoll.unregister(pidfd)
        os.close(pidfd)
        event = threading.Event()
        self._pruning[pid] = event
        return event

    def _prune(self, pid: int, event: threading.Event) -> None:
        try:
            self._on_exit(pid)
        except Exception:
            log.exception("pruning exited process %d failed", pid)
        finally:
            with self._lock:
                del self._pruning[pid]
            event.set()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                # closed under us: stop() gave up waiting for a long prune and shut down
                # (a closed epoll object raises ValueError, a closed fd OSError)
                return
            exited: list[tuple[int, threading.Event]] = []
            with self._lock:
                if self._stopping:
                    return
                for fd, _mask in events:
                    pid = self._pids_by_fd.get(fd)
                    if pid is not None:
                        exited.append((pid, self._claim(pid, fd)))
            for pid, event in exited:
                self._prune(pid, event)

    def stop(self, join_timeout: float = 5.0) -> None:
        """Stop the thread and close every pidfd (the stash keeps its entries).

        A prune in progress may outlast *join_timeout*: the thread then ends on
        its own once it is done, and no pidfd is left open either way.
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=join_timeout)
        with self._lock:
            for pidfd in self._pidfds.values():
                os.close(pidfd)
            self._pidfds.clear()
            self._pids_by_fd.clear()
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
