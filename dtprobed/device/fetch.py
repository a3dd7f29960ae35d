"""Fetch a FUSE-file caller's DOF off the device loop, with a bound on time.

In FUSE-file mode the kernel hands us only the 80-byte ``dof_helper_t``; the
DOF must be read from the caller.  The caller's pages may lie in a file of a
FUSE file system whose READ never completes: ``process_vm_readv`` then waits
in the kernel, uninterruptibly once the READ reached that server, and
SIGKILL does not end the wait (measured; ``tests/device/test_fetch.py``).  So:

* the device thread never reads client memory; the receiver's lane worker
  calls :meth:`FetchPool.fetch`;
* the read happens in a **fetch helper process** (:mod:`dtprobed.device.fetchd`),
  taken from a pool for one request (the one used last, so one helper serves
  a steady trickle), started when none is idle: at most one per thread that
  fetches at the same time;
* a fetch that goes silent for ``timeout`` seconds (no chunk of at most
  1 MiB arrived) is *abandoned*: the helper gets SIGKILL (it dies once the
  wait ends, i.e. when the hostile server answers or goes away), is counted
  as **stuck** against the caller's uid until it is reaped, and the worker
  starts a fresh helper for its next request.  The request fails with EINVAL
  (:class:`FetchTimeout`), which the receiver counts as its sender's offence;
* while a uid has ``max_stuck_per_uid`` stuck helpers, its further ADDDOF are
  refused at once (:meth:`FetchPool.stuck`); a stuck helper costs the daemon
  one small process, never a thread, so stuck fetches cost only their
  sender's share and the daemon still stops on SIGTERM (it does not wait for
  a stuck helper: reaping is ``waitpid(WNOHANG)``; whatever remains is
  reaped by init once the wait ends).

Cost before allocation: the answer arrives in chunks and is read into a
growing buffer, so a header that claims 256 MiB costs only the bytes that
were actually readable.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from common.dof_abi import DOF_HDR
from common.errors import RequestRejected
from common.limits import DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_STUCK_FETCHES_PER_UID
from dtprobed.device.fetchd import CODE, REQUEST

_F_SETPIPE_SZ: Final = 1031
_PIPE_SIZE: Final = 1 << 20
_READ_CHUNK: Final = 1 << 20
_MIN_READ: Final = 64 << 10  # a read buffer that the malloc thresholds keep off brk


class FetchTimeout(RequestRejected):
    """The caller's memory did not come within the fetch timeout (its sender's fault)."""


@dataclass
class _Stuck:
    proc: subprocess.Popen[bytes]
    uid: int
    since: float


class Fetcher:
    """One fetch helper process, used by one thread at a time."""

    def __init__(self, argv: list[str]) -> None:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(ans_w, _F_SETPIPE_SZ, _PIPE_SIZE)
        try:
            self.proc = subprocess.Popen(
                argv, stdin=req_r, stdout=ans_w, close_fds=True, cwd="/", start_new_session=False
            )
        finally:
            os.close(req_r)
            os.close(ans_w)
        self._to = req_w
        self._from = ans_r
        os.set_blocking(ans_r, False)
        self._poll = select.poll()
        self._poll.register(ans_r, select.POLLIN)
        self._pending = bytearray()

    def close(self) -> None:
        for fd in (self._to, self._from):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _read(self, want: int, timeout: float) -> bytes | None:
        """Up to *want* bytes; None when nothing came for *timeout* s; b"" at EOF."""
        if self._pending:
            data = bytes(self._pending[:want])
            del self._pending[:want]
            return data
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not self._poll.poll(max(1, int(left * 1000))):
                continue
            try:
                # at least _MIN_READ: a small DOF's whole answer (its header's code and
                # bytes, the rest's) comes in one read, not four
                data = os.read(self._from, max(_MIN_READ, min(want, _READ_CHUNK)))
            except BlockingIOError:
                continue
            if len(data) > want:
                self._pending += data[want:]
                data = data[:want]
            return data

    def _exact_into(self, out: bytearray, size: int, timeout: float) -> bool:
        """Append exactly *size* bytes to *out*; False on silence (timeout) or EOF."""
        while size > 0:
            data = self._read(size, timeout)
            if not data:
                return False
            out += data
            size -= len(data)
        return True

    def fetch(
        self,
        tid: int,
        address: int,
        max_size: int,
        stream_limit: int,
        timeout: float,
        meanwhile: Callable[[], object] | None = None,
    ) -> bytearray | int | None:
        """The header (and, within *stream_limit*, the whole DOF); ``-errno`` if the
        read faulted; None if the helper went silent for *timeout* s or died.

        *meanwhile* runs once the request is sent, while the helper reads; what it
        raises propagates (the answer is then left unread: the caller abandons us)."""
        os.write(self._to, REQUEST.pack(tid, address, max_size, stream_limit))
        if meanwhile is not None:
            meanwhile()
        out = bytearray()
        expected = DOF_HDR.size
        while True:
            raw = bytearray()
            if not self._exact_into(raw, CODE.size, timeout):
                return None
            (code,) = CODE.unpack(raw)
            if code < 0:
                return int(code)
            if code > _READ_CHUNK or len(out) + code > max(expected, DOF_HDR.size):
                return None  # not what the helper promised: treat it as broken
            if not self._exact_into(out, code, timeout):
                return None
            if len(out) == DOF_HDR.size and expected == DOF_HDR.size:
                loadsz = int(DOF_HDR.unpack_from(out).loadsz)
                if not DOF_HDR.size <= loadsz <= min(max_size, stream_limit):
                    return self._complete(out)
                expected = loadsz
            if len(out) >= expected:
                return self._complete(out)

    def _complete(self, answer: bytearray) -> bytearray | None:
        """*answer*, unless the helper sent more than it: then it is broken (None)."""
        return None if self._pending else answer


class FetchPool:
    """Fetch helpers for the receiver's worker threads, and the stuck ones per uid."""

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        max_stuck_per_uid: int = DEFAULT_MAX_STUCK_FETCHES_PER_UID,
        log: logging.Logger | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.max_stuck_per_uid = max_stuck_per_uid
        self.log = log or logging.getLogger("dtprobed.device")
        self._argv = argv or [sys.executable, "-I", "-m", "dtprobed.device.fetchd"]
        self._lock = threading.Lock()
        self._all: list[Fetcher] = []
        self._idle: list[Fetcher] = []  # helpers no request uses, the last used last
        self._stuck: list[_Stuck] = []
        self._closed = False

    # --- stuck helpers -------------------------------------------------------------------
    def _reap(self) -> None:
        with self._lock:
            alive = [s for s in self._stuck if s.proc.poll() is None]
            for s in self._stuck:
                if s.proc.returncode is not None:
                    self.log.info(
                        "fetch helper %d of uid %d ended after %.1f s stuck",
                        s.proc.pid,
                        s.uid,
                        time.monotonic() - s.since,
                    )
            self._stuck = alive

    def stuck(self, uid: int) -> int:
        """How many abandoned helpers of *uid* are still stuck in the kernel."""
        self._reap()
        with self._lock:
            return sum(1 for s in self._stuck if s.uid == uid)

    def stuck_total(self) -> int:
        self._reap()
        with self._lock:
            return len(self._stuck)

    def over_stuck_limit(self, uid: int) -> bool:
        return self.stuck(uid) >= self.max_stuck_per_uid

    # --- fetching ------------------------------------------------------------------------
    def _fetcher(self) -> Fetcher:
        """An idle helper (the one used last), or a new one when all are busy."""
        with self._lock:
            if self._closed:
                raise RequestRejected(_errno.EINVAL, "the daemon is shutting down")
            if self._idle:
                return self._idle.pop()
            fetcher = Fetcher(self._argv)
            self._all.append(fetcher)
            return fetcher

    def _put_back(self, fetcher: Fetcher) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(fetcher)

    def _abandon(self, fetcher: Fetcher, uid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            fetcher.proc.send_signal(signal.SIGKILL)
        fetcher.close()
        with self._lock:
            with contextlib.suppress(ValueError):
                self._all.remove(fetcher)
            self._stuck.append(_Stuck(fetcher.proc, uid, time.monotonic()))

    def fetch(
        self,
        tid: int,
        uid: int,
        address: int,
        *,
        max_size: int,
        stream_limit: int,
        meanwhile: Callable[[], object] | None = None,
    ) -> bytes:
        """The DOF header (64 bytes) and, if its ``loadsz`` ≤ *stream_limit*, the rest.

        Raises :class:`RequestRejected` (EINVAL) when the memory is unreadable,
        :class:`FetchTimeout` when it did not come in time (the helper is
        abandoned, counted against *uid*).  *meanwhile* runs in this thread while
        the helper reads (the receiver reads the caller's /proc then); an
        exception from it is raised once the answer is in, unless the fetch failed.
        """
        self._reap()
        fetcher = self._fetcher()
        side_error: Exception | None = None

        def side() -> None:
            nonlocal side_error
            if meanwhile is not None:
                try:
                    meanwhile()
                except Exception as err:
                    side_error = err

        try:
            got = fetcher.fetch(tid, address, max_size, stream_limit, self.timeout, side)
        except OSError as err:  # the helper died (EPIPE)
            self._abandon(fetcher, uid)
            raise RequestRejected(_errno.EINVAL, f"fetch helper failed: {err}") from err
        if got is None:
            self._abandon(fetcher, uid)
            raise FetchTimeout(
                _errno.EINVAL,
                f"DOF at {address:#x} not readable within {self.timeout:g} s "
                f"(a page on a stalled file system?); fetch abandoned",
            )
        self._put_back(fetcher)  # it answered in full: ready for the next request
        if isinstance(got, int):
            raise RequestRejected(
                _errno.EINVAL, f"cannot read DOF at {address:#x}: {os.strerror(-got)}"
            )
        if side_error is not None:
            raise side_error
        return bytes(got)

    def close(self) -> None:
        """Stop every idle helper (EOF); stuck ones are left to the kernel and init."""
        with self._lock:
            self._closed = True
            fetchers, self._all = self._all, []
            self._idle = []
            stuck, self._stuck = self._stuck, []
        for f in fetchers:
            f.close()
        deadline = time.monotonic() + 1.0
        for f in fetchers:
            try:
                f.proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                f.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    f.proc.wait(0.2)
        for s in stuck:
            if s.proc.poll() is None:
                self.log.warning(
                    "fetch helper %d of uid %d still stuck in the kernel; left behind",
                    s.proc.pid,
                    s.uid,
                )
