"""Directory file descriptors that are opened safely and forgotten on close.

Every stash operation is relative to a directory fd (``dir_fd=``): an absolute
path appears once, when the state directory is opened.  A :class:`DirFd` is
opened with ``O_DIRECTORY|O_NOFOLLOW|O_CLOEXEC``, so a symlink, FIFO or file
planted where a directory is expected is refused (``ENOTDIR``/``ELOOP``),
never followed.

Facts we rely on (open(2)):

* ``O_PATH`` fds serve as ``dir_fd`` for every ``*at()`` call but not for
  ``getdents``, ``flock`` or ``fsetxattr`` (those give ``EBADF``); we open
  ``O_RDONLY`` instead where a directory must be listed, locked or given an
  extended attribute.
* ``O_NOFOLLOW`` with ``O_DIRECTORY`` fails with ``ELOOP`` when the last
  component is a symlink; intermediate components never occur because every
  name we open is a single path component (checked here).
"""

from __future__ import annotations

import contextlib
import errno
import os
from types import TracebackType
from typing import Final

_BASE_FLAGS: Final = os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW


def check_component(name: str) -> None:
    """Refuse anything that is not one plain path component."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, f"not a single path component: {name!r}")


class DirFd:
    """An owned directory fd; ``fd`` is -1 whenever nothing is held.

    *parent* is a directory fd (or None with an absolute *path*, used once for
    the state directory).  *readable* opens ``O_RDONLY`` instead of ``O_PATH``.
    """

    __slots__ = ("fd", "name")

    def __init__(self, parent: int | None, path: str, *, readable: bool = False) -> None:
        self.fd = -1  # set first, so close() is safe if open fails
        self.name = path
        if parent is not None:
            check_component(path)
        flags = _BASE_FLAGS | (os.O_RDONLY if readable else os.O_PATH)
        self.fd = os.open(path, flags, dir_fd=parent)

    @classmethod
    def make(cls, parent: int, name: str, mode: int = 0o755, *, readable: bool = False) -> DirFd:
        """Open *name* in *parent*, creating it first if missing (an existing dir is fine)."""
        check_component(name)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=parent)
        return cls(parent, name, readable=readable)

    def close(self) -> None:
        fd, self.fd = self.fd, -1  # forget the number before closing it
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> DirFd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
