"""The name ``ps`` and ``top`` show for a process: one per role of the daemon's processes."""

from __future__ import annotations

import ctypes

_PR_SET_NAME = 15
#: The kernel keeps at most 15 bytes of a task name (TASK_COMM_LEN 16, NUL included).
MAX_NAME = 15


def set_process_name(name: bytes) -> bool:
    """``prctl(PR_SET_NAME)``; False when it failed (the name is cosmetic)."""
    if len(name) > MAX_NAME or b"\0" in name:
        raise ValueError(f"process name {name!r} is not 1..{MAX_NAME} bytes without NUL")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    return int(libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)) == 0
