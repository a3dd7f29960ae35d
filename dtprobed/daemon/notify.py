"""sd_notify(3) without libsystemd: READY=1, WATCHDOG=1, STOPPING=1 over ``$NOTIFY_SOCKET``.

Facts we rely on (sd_notify(3), "Notes"): the service manager passes an
``AF_UNIX`` datagram socket path in ``$NOTIFY_SOCKET``; a leading ``@`` means
the abstract namespace (the ``@`` becomes a NUL byte).  Each notification is
one datagram of newline-separated ``KEY=VALUE`` lines.  ``$WATCHDOG_USEC``
(with ``$WATCHDOG_PID`` naming us, when set) asks for ``WATCHDOG=1`` more
often than that interval; we send it at half of it.

Notifications are best effort: a missing or broken socket is logged once and
ignored, never fatal (upstream's libport behaves the same).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Final

log = logging.getLogger("dtprobed")

NOTIFY_SOCKET: Final = "NOTIFY_SOCKET"


class Notifier:
    """Sends notifications to the service manager, if there is one."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get(NOTIFY_SOCKET, "")
        self._address: str | bytes | None = None
        if path.startswith("@"):
            self._address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self._address = path
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> None:
        if self._address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as err:
            if not self._warned:
                log.warning("cannot notify the service manager: %s", err)
                self._warned = True

    def ready(self) -> None:
        self.notify("READY=1", f"MAINPID={os.getpid()}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: os._Environ[str] | dict[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(os.getpid()):
        return None
    return int(usec) / 2e6
