"""Whether a process behind a pidfd has exited."""

from __future__ import annotations

import select


def pidfd_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited.

    ``poll``, not ``select``: pidfds go far beyond FD_SETSIZE (1024).
    """
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
