"""The parser child's seccomp allowlist: every syscall it may make after the lock, and why.

The table is data so that a test can check it (sorted, every entry has a
reason, every name resolves on this architecture) and so that a change to it
shows up in review as a change of one line.  :mod:`parserd.sandbox` turns it
into a libseccomp filter whose default action kills the process.

Facts we rely on (checked by running the child under the ``trap`` debug switch,
CPython 3.11, glibc 2.36, x86_64; ``tests/sandbox`` re-checks them on every run):

* after every import, encoder and decoder is built and every code path has run
  once (the warm-up), CPython's read → msgspec decode → parse → encode → write
  loop needs only ``read``, ``write``, memory management and exit: under
  ``strace -f``, requests of 10 B to 30 MB made ``read``, ``write``, ``brk``,
  ``mmap``, ``munmap`` and ``exit_group`` and nothing else;
* glibc serves small allocations from the brk heap and large ones (≥ 128 KiB,
  e.g. a request frame) with ``mmap``; ``realloc`` of a large block is
  ``mremap``; ``free`` returns memory with ``munmap`` or ``madvise``;
* the child never reads a clock, so ``clock_gettime`` (a real syscall under
  some emulators) and ``getrandom`` (hash seeds, taken at start-up) are not
  needed; neither is ``rt_sigprocmask``/``rt_sigaction`` (no handler is set
  after the lock);
* ``futex`` is only reached when a lock is contended; the child has one
  thread, but CPython's GIL machinery may still touch it.

Argument pinning (OpenSSH's ``SC_ALLOW_ARG``): ``read`` only on fd 0 (the
request pipe), ``write`` only on fd 1 (the record pipe; log lines travel there
as ``Log`` records), and ``mmap``/``mprotect`` never with ``PROT_EXEC``.
"""

from __future__ import annotations

import mmap
from typing import Final, Literal, NamedTuple

#: The fds the child reads requests from and writes records to.
REQUEST_FD: Final = 0
RECORD_FD: Final = 1
#: stderr: written only by faulthandler in the ``trap`` debug mode.
DEBUG_FD: Final = 2


class Pin(NamedTuple):
    """A condition on one syscall argument (libseccomp ``SCMP_CMP_*``).

    ``EQ``: ``arg == value``.  ``MASKED_EQ``: ``arg & mask == value``.
    """

    arg: int
    op: Literal["EQ", "MASKED_EQ"]
    value: int
    mask: int = 0


class Rule(NamedTuple):
    """Allow *syscall* when every pin holds (no pins: always)."""

    syscall: str
    why: str
    pins: tuple[Pin, ...] = ()


_NO_EXEC: Final = (Pin(2, "MASKED_EQ", 0, mmap.PROT_EXEC),)

#: Sorted by syscall name.  Default action for everything else: kill the process.
ALLOWLIST: Final[tuple[Rule, ...]] = (
    Rule("brk", "glibc malloc grows and trims its main heap"),
    Rule("exit", "thread exit (CPython may end a helper thread); no process side effects"),
    Rule("exit_group", "os._exit: the only way the child leaves"),
    Rule("futex", "CPython's GIL and locks wait here when contended"),
    Rule("madvise", "glibc free() and pymalloc hand pages back (MADV_DONTNEED)"),
    Rule("mmap", "glibc malloc of large blocks (request frames, record lists); never PROT_EXEC", _NO_EXEC),
    Rule("mprotect", "glibc may change protection of heap pages; never to PROT_EXEC", _NO_EXEC),
    Rule("mremap", "realloc of a large block (a growing bytearray or list)"),
    Rule("munmap", "glibc free() of large blocks"),
    Rule("read", "requests arrive on fd 0 only", (Pin(0, "EQ", REQUEST_FD),)),
    Rule("rt_sigreturn", "return from a signal handler (the kernel needs it to resume)"),
    Rule("write", "records and Log records leave on fd 1 only", (Pin(0, "EQ", RECORD_FD),)),
)  # fmt: skip

#: Added only in the ``trap`` debug mode, so faulthandler can print the Python stack.
DEBUG_EXTRA: Final[tuple[Rule, ...]] = (
    Rule("write", "faulthandler's traceback on stderr (debug mode only)", (Pin(0, "EQ", DEBUG_FD),)),
)  # fmt: skip
