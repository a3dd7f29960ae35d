"""The daemon's private run directory: its pid file and the catch-up completion marker.

``/run/dtprobed`` is the directory where stash writers take their lock (root's,
0700: see :func:`dtprobed.stash.store.writer_lock`); no other user can read,
create or replace a file in it.  Per state directory (named by its ``$dev-$ino``,
like the writer's lock) the daemon keeps there:

* ``daemon-$dev-$ino.pid``: ``PID START_TIME`` of the daemon serving that state
  directory (start time: field 22 of ``/proc/PID/stat``), written once it is
  ready, removed when it stops.  ``dtprobed-stash catch-up`` signals that pid
  only when its start time still matches: a stale file never makes it signal
  some other process that reused the pid.
* ``catch-up-$dev-$ino.json``: one JSON object about the last catch-up that
  finished: ``started`` and ``finished`` (``CLOCK_MONOTONIC`` seconds, system
  wide on Linux, so another process can compare them with its own clock), and
  the counts of its summary line.  Replaced atomically (written, then renamed).

Nothing here is in the state directory itself: that tree is world-readable and
upstream's layout, and its consumer and upstream's daemon know nothing of these.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import Final

#: The writer lock's directory (the default of ``dtprobed.stash.store.DEFAULT_LOCK_DIR``).
RUN_DIR: Final = "/run/dtprobed"
#: Largest marker or pid file read back.
MAX_CONTROL_FILE: Final = 64 * 1024


def _suffix(state_dir: str) -> str:
    st = os.stat(state_dir)
    return f"{st.st_dev}-{st.st_ino}"


def pid_file_name(state_dir: str) -> str:
    return f"daemon-{_suffix(state_dir)}.pid"


def marker_name(state_dir: str) -> str:
    return f"catch-up-{_suffix(state_dir)}.json"


def open_run_dir(run_dir: str = RUN_DIR) -> int:
    """A directory fd on *run_dir*, refused unless it is ours and closed to others (0700)."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(
                f"{run_dir} is mode {stat.S_IMODE(st.st_mode):04o} owned by uid {st.st_uid}: "
                "it must be 0700 and ours"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomically(dir_fd: int, name: str, data: bytes) -> None:
    """*name* in *dir_fd* holds *data*, replaced in one rename (readers see old or new)."""
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
        dir_fd=dir_fd,
    )  # fmt: skip
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def read_small(dir_fd: int, name: str) -> bytes | None:
    """The file's bytes (at most :data:`MAX_CONTROL_FILE`), None when it does not exist."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, MAX_CONTROL_FILE)
    finally:
        os.close(fd)


def read_marker(dir_fd: int, state_dir: str) -> dict[str, object] | None:
    """The last catch-up's marker, None when there is none or it is not a JSON object."""
    raw = read_small(dir_fd, marker_name(state_dir))
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
