"""Reading a process's ``/proc`` files, bounded, and parsing them (proc(5)).

Facts we rely on:

* ``/proc/PID/stat``: field 2 is ``(comm)`` and comm may hold spaces and
  parentheses, so fields are counted after the *last* ``)``.  Field 3 is the
  state, 14 and 15 user and system CPU time in clock ticks, 22 the start time
  in clock ticks since boot — with the pid it names one process for the life
  of the system (a reused pid gets a later start time).
* ``/proc/PID/auxv`` holds the ELF auxiliary vector as (type, value) pairs of
  the process's word size, ending with ``AT_NULL``.  ``AT_PHDR`` is the main
  executable's program headers; ``AT_RANDOM`` is the address of 16 random
  bytes on the initial stack, which moves on every ``execve`` while ASLR is on.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Final

from dtprobed.oslib.fdio import read_all

AT_NULL: Final = 0
AT_PHDR: Final = 3
AT_RANDOM: Final = 25

#: A /proc file larger than this is not one we asked for (maps of 65530
#: mappings with long paths stays well below).
MAX_PROC_READ: Final = 64 << 20
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def read_proc(path: str, limit: int = MAX_PROC_READ) -> bytes:
    """The whole of a /proc file, at most *limit* bytes (``EFBIG`` beyond)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_all(fd, limit, what=path)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` the daemon uses."""

    state: str
    utime: int  # clock ticks
    stime: int
    start_time: int  # clock ticks since boot

    @property
    def cpu_seconds(self) -> float:
        return (self.utime + self.stime) / _CLOCK_TICKS


def parse_stat(data: bytes) -> ProcStat:
    """Parse ``/proc/PID/stat``; ``ValueError`` when it is not one."""
    close = data.rfind(b")")
    if close < 0:
        raise ValueError("stat without ')'")
    fields = data[close + 1 :].split()  # fields[0] is field 3
    if len(fields) < 22 - 2:
        raise ValueError(f"stat has {len(fields) + 2} fields, fewer than 22")
    return ProcStat(
        state=fields[0].decode("ascii", "replace"),
        utime=int(fields[14 - 3]),
        stime=int(fields[15 - 3]),
        start_time=int(fields[22 - 3]),
    )


def parse_start_time(data: bytes) -> int:
    """Field 22 of ``/proc/PID/stat``."""
    return parse_stat(data).start_time


def stat_of(pid: int) -> ProcStat | None:
    """The stat of process *pid*; None when it does not exist (or its stat is unreadable)."""
    try:
        return parse_stat(read_proc(f"/proc/{pid}/stat", 4096))
    except (OSError, ValueError):
        return None


def start_time_of(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None when the process does not exist."""
    st = stat_of(pid)
    return st.start_time if st is not None else None


def fsuid_of(pid: int) -> int | None:
    """The file-system uid of *pid* (the 4th ``Uid:`` field of /proc/PID/status: the
    uid the kernel reports for a FUSE/CUSE caller), or None when unreadable."""
    try:
        data = read_proc(f"/proc/{pid}/status", 1 << 16)
    except OSError:
        return None
    for line in data.splitlines():
        if line.startswith(b"Uid:"):
            fields = line.split()
            if len(fields) == 5 and fields[4].isdigit():
                return int(fields[4])
    return None


def parse_auxv(data: bytes) -> dict[int, int]:
    """Decode an auxiliary vector; 64-bit words, or 32-bit for a compat process."""
    for fmt in ("=QQ", "=II"):
        size = struct.calcsize(fmt)
        if len(data) % size:
            continue
        entries = list(struct.iter_unpack(fmt, data))
        if entries and entries[-1] == (AT_NULL, 0) and all(t < 4096 for t, _ in entries):
            return {t: v for t, v in entries if t != AT_NULL}
    raise ValueError("unrecognised auxv")


def exec_token(auxv: dict[int, int]) -> str:
    """What changes with every ``execve()`` of a process, even of the same binary.

    ``AT_RANDOM`` points at 16 random bytes on the new stack, so its address
    moves on every exec while ASLR is on; with ASLR off it repeats (an exec of
    the same binary is then missed).  Empty when the vector has no AT_RANDOM.
    """
    random = auxv.get(AT_RANDOM)
    return f"at_random:{random:x}" if random else ""


def current_exec_token(pid: int) -> str | None:
    """The exec token of running process *pid*; None if its auxv can't be read."""
    try:
        return exec_token(parse_auxv(read_proc(f"/proc/{pid}/auxv", 1 << 16)))
    except (OSError, ValueError):
        return None
