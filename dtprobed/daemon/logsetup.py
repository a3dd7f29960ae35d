"""Where the daemon's log lines go: stderr with ``-F``, else syslog/the journal.

Levels: INFO for one line per registration, removal and prune; WARNING for
rejected DOF; ERROR for child failures; ``-d`` adds DEBUG detail.  Children
never write a log themselves: they send their lines to the daemon, which writes them here
with their role.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Final

SYSLOG_SOCKET: Final = "/dev/log"


def setup_logging(*, foreground: bool, debug: bool) -> logging.Logger:
    """Configure the ``dtprobed`` logger and return it."""
    log = logging.getLogger("dtprobed")
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    handler: logging.Handler
    if foreground or not os.path.exists(SYSLOG_SOCKET):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s dtprobed[%(process)d] %(levelname)s: %(message)s")
        )
    else:
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(logging.Formatter("dtprobed[%(process)d]: %(message)s"))
    log.addHandler(handler)
    return log
