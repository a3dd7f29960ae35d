"""Read another process's memory with ``process_vm_readv(2)``, in bounded chunks.

Used in FUSE-file mode, where the kernel hands us only the 80-byte
``dof_helper_t`` and the DOF has to be fetched from the caller.

Facts we rely on:

* ``process_vm_readv`` accepts a thread id as well as a process id (it looks up
  the task, then uses its mm), so the ``pid`` FUSE reports — the calling
  thread — can be used directly.
* A range that runs into an unmapped page is a *partial* read (the count of
  bytes read before the hole); a range that starts in one fails with EFAULT.
  Either way we treat "fewer bytes than asked" as a fault: a DOF is contiguous.
* It needs ptrace-read permission on the target (root has it; Yama is off
  here) and never blocks on the target: no stop, no signal.
* Python 3.11 has no wrapper, hence ctypes; ``use_errno=True`` keeps errno.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from typing import Final

CHUNK_SIZE: Final = 1 << 20  # bytes per syscall: bounds the kernel's pinned pages per call
_ADDRESS_LIMIT: Final = 1 << 64


class _IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = (
    ctypes.c_int,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
)
_process_vm_readv.restype = ctypes.c_ssize_t


def read_memory(pid: int, address: int, size: int, *, chunk_size: int = CHUNK_SIZE) -> bytes:
    """Exactly *size* bytes at *address* in process (or thread) *pid*; see :func:`read_memory_into`."""
    out = bytearray(size)
    read_memory_into(pid, address, out, chunk_size=chunk_size)
    return bytes(out)


def read_memory_into(
    pid: int, address: int, out: bytearray, *, offset: int = 0, chunk_size: int = CHUNK_SIZE
) -> None:
    """Fill ``out[offset:]`` with the bytes at *address* in process (or thread) *pid*.

    Raises OSError: EFAULT when any part of the range is unreadable (or the
    range wraps the address space), ESRCH when the task is gone, EPERM when we
    may not read it.  The caller bounds the size (it allocated *out*).
    """
    size = len(out) - offset
    if size < 0 or address < 0 or address + size > _ADDRESS_LIMIT:
        raise OSError(_errno.EFAULT, f"range {address:#x}+{size} outside the address space")
    if size == 0:
        return
    base = (ctypes.c_char * len(out)).from_buffer(out)
    try:
        start = ctypes.addressof(base) + offset
        local = _IoVec()
        remote = _IoVec()
        done = 0
        while done < size:
            want = min(chunk_size, size - done)
            local.iov_base = start + done
            local.iov_len = want
            remote.iov_base = address + done
            remote.iov_len = want
            got = _process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
            if got < 0:
                err = ctypes.get_errno()
                raise OSError(
                    err, f"process_vm_readv({pid}, {address + done:#x}, {want}): {os.strerror(err)}"
                )
            if got < want:
                raise OSError(
                    _errno.EFAULT, f"only {done + got} of {size} bytes readable at {address:#x}"
                )
            done += got
    finally:
        del base  # release the buffer export so *out* can be resized or converted
