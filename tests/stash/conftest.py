"""Stash tests: remove the lock files their writers left in /run/dtprobed.

Many tests end a writer without closing it (``os._exit`` in a forked child,
SIGKILL, an unclosed :class:`Stash`); each leaves its state directory's lock
file (docs/stash.md).  At the end of the session every lock file that no
writer holds is removed, by the writers' own protocol: take the lock, check
the name is still that file, unlink while holding.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

import pytest

from dtprobed.stash.store import DEFAULT_LOCK_DIR


def remove_unheld_locks(lock_dir: str = DEFAULT_LOCK_DIR) -> int:
    try:
        dfd = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return 0
    removed = 0
    try:
        for name in os.listdir(dfd):
            if not (name.startswith("stash-") and name.endswith(".lock")):
                continue
            try:
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    os.unlink(name, dir_fd=dfd)
                    removed += 1
            except OSError:
                pass  # held by a live writer, or gone meanwhile
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)
    finally:
        os.close(dfd)
    return removed


@pytest.fixture(scope="session", autouse=True)
def _clean_writer_locks() -> Iterator[None]:
    yield
    remove_unheld_locks()
