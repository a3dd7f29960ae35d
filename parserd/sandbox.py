"""Lock the parser child: resource limits, no_new_privs, its name, then the seccomp filter.

:func:`lock` does only this, in this order, and every step is fatal on failure
(the caller exits; a parser that could not lock itself must never read a
request):

1. the caller's warm-up (imports, codecs, one parse and one deliberate decode
   error, so no lazy import or first-use path runs under the filter);
2. rlimits: address space, CPU time (a lifetime backstop — it accumulates and
   cannot be reset under the filter, so the host restarts the child well
   before it), no new files, no file growth, no processes, no core dumps;
3. ``PR_SET_NO_NEW_PRIVS`` (required for an unprivileged filter, and right
   anyway) and ``PR_SET_NAME`` so ``ps`` shows ``dtprobed-parse``;
4. the filter built from :mod:`parserd.allowlist`, default action
   ``KILL_PROCESS``.

Debug switch: ``DTPROBED_SECCOMP_DEBUG=trap`` makes the default action TRAP and
registers faulthandler for SIGSYS (the Python stack of the forbidden call goes
to stderr, which that mode alone may write); ``=log`` makes it LOG (the kernel
logs the call and lets it through).  The unit file never sets it.

Facts we rely on:

* ``SECCOMP_RET_KILL_PROCESS`` kills the whole thread group with SIGSYS, which
  the host sees as the exit status (``-SIGSYS``) — that is how it tells a
  sandbox violation from a crash;
* a filter survives ``execve`` and cannot be removed; the child never execs;
* RLIMIT_NPROC is not enforced for root (CAP_SYS_RESOURCE); the filter forbids
  clone/fork anyway, the limit is defence in depth for an unprivileged daemon.
"""

from __future__ import annotations

import ctypes
import enum
import faulthandler
import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import Any, Final

import pyseccomp

from common.process_name import set_process_name
from parserd.allowlist import ALLOWLIST, DEBUG_EXTRA, Rule

DEBUG_ENV: Final = "DTPROBED_SECCOMP_DEBUG"
PROCESS_NAME: Final = b"dtprobed-parse"

_PR_SET_NO_NEW_PRIVS: Final = 38

#: Address space on top of what the interpreter already maps: the request frame,
#: its decoded copy and the parser's working set are each at most about one DOF.
_DOF_COPIES: Final = 3
_AS_HEADROOM: Final = 256 * 1024 * 1024


class DebugMode(enum.Enum):
    OFF = ""
    TRAP = "trap"
    LOG = "log"


class SandboxError(Exception):
    """A locking step failed; the child must exit without reading a request."""


def debug_mode_from_env(environ: dict[str, str] | None = None) -> DebugMode:
    value = (os.environ if environ is None else environ).get(DEBUG_ENV, "")
    try:
        return DebugMode(value.strip().lower())
    except ValueError:
        raise SandboxError(f"{DEBUG_ENV}={value!r}: expected trap or log") from None


def _seccomp_arg(pin: Any) -> pyseccomp.Arg:
    if pin.op == "EQ":
        return pyseccomp.Arg(pin.arg, pyseccomp.EQ, pin.value)
    return pyseccomp.Arg(pin.arg, pyseccomp.MASKED_EQ, pin.mask, pin.value)


def rules(debug: DebugMode = DebugMode.OFF) -> tuple[Rule, ...]:
    """The rules the filter is built from in *debug* mode."""
    return ALLOWLIST + (DEBUG_EXTRA if debug is DebugMode.TRAP else ())


def build_filter(debug: DebugMode = DebugMode.OFF) -> pyseccomp.SyscallFilter:
    """The filter, not yet loaded (tests export it as text)."""
    default = {
        DebugMode.OFF: pyseccomp.KILL_PROCESS,
        DebugMode.TRAP: pyseccomp.TRAP,
        DebugMode.LOG: pyseccomp.LOG,
    }[debug]
    flt = pyseccomp.SyscallFilter(default)
    # A syscall made through another ABI (int 0x80 on x86_64) kills the process too,
    # not just the thread (libseccomp's default for a foreign arch is KILL_THREAD).
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for rule in rules(debug):
        flt.add_rule(pyseccomp.ALLOW, rule.syscall, *(_seccomp_arg(p) for p in rule.pins))
    return flt


def _current_address_space() -> int:
    # Read before the lock; /proc/self/statm's first field is VmSize in pages.
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def set_rlimits(*, max_dof_size: int, cpu_seconds: int) -> dict[str, int]:
    """Apply the child's rlimits; returns what was set (for the start-up Log record)."""
    address_space = _current_address_space() + _DOF_COPIES * max_dof_size + _AS_HEADROOM
    limits = {
        # Soft CPU limit sends SIGXCPU (a crash the host logs); the hard one SIGKILL.
        "RLIMIT_CPU": (cpu_seconds, cpu_seconds + 5),
        "RLIMIT_AS": (address_space, address_space),
        "RLIMIT_NOFILE": (3, 3),  # fds 0-2 exist; no new ones
        "RLIMIT_FSIZE": (0, 0),  # pipes are not files; any file write would fail
        "RLIMIT_NPROC": (0, 0),
        "RLIMIT_CORE": (0, 0),  # no core dump of a process that held hostile input
    }
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), value)
    return {name: soft for name, (soft, _) in limits.items()}


def _prctl(option: int, arg: int | bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"prctl({option}) failed: {os.strerror(err)}")


def lock(
    *,
    warm_up: Callable[[], None],
    max_dof_size: int,
    cpu_seconds: int,
    debug: DebugMode = DebugMode.OFF,
    seccomp: bool = True,
) -> str:
    """Warm up, limit, lock.  Returns a one-line summary for a Log record.

    With ``seccomp=False`` (``--no-sandbox``, debugging the parser only) the
    rlimits and process name are still set but no filter is loaded.
    """
    warm_up()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the daemon
    applied = set_rlimits(max_dof_size=max_dof_size, cpu_seconds=cpu_seconds)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    set_process_name(PROCESS_NAME)
    summary = " ".join(f"{k}={v}" for k, v in applied.items())
    if not seccomp:
        return f"NOT sandboxed (--no-sandbox); {summary}"
    if debug is DebugMode.TRAP:
        faulthandler.register(signal.SIGSYS, file=sys.stderr, all_threads=False)
    flt = build_filter(debug)
    flt.load()
    mode = f" DEBUG {debug.value}" if debug is not DebugMode.OFF else ""
    return f"seccomp filter loaded ({len(rules(debug))} rules{mode}); {summary}"
