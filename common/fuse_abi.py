"""The kernel FUSE/CUSE wire ABI (``<linux/fuse.h>``), declared once as data.

Only the subset the helper device speaks is declared: the message headers,
INIT and CUSE_INIT, the attribute/entry/open/statfs replies, the ioctl
request/reply with its retry iovecs, and the small request bodies we decode
(GETATTR, OPEN, FLUSH, RELEASE, INTERRUPT, FORGET, BATCH_FORGET).

Every message read from ``/dev/fuse`` (or ``/dev/cuse``) is one request::

    struct fuse_in_header (40 bytes) | opcode-specific struct | payload

and every reply written back is::

    struct fuse_out_header (16 bytes) | opcode-specific struct | payload

with ``len`` covering the whole message and ``unique`` copied from the
request.  ``fuse_out_header.error`` is 0 or a negative errno (> -512).

Layouts follow the header this machine ships (``FUSE_KERNEL_VERSION`` 7,
``FUSE_KERNEL_MINOR_VERSION`` 38); the kernel accepts any minor ≤ its own,
and a newer kernel (6.18 here offers a higher minor) talks 7.38 with us.
Sizes are the kernel's ``sizeof`` and are checked at import by
:class:`common.layout.Layout`.  Nested structs (``fuse_attr`` inside
``fuse_attr_out`` and ``fuse_entry_out``) are spliced in field by field.
"""

from __future__ import annotations

from typing import Final

from common.layout import Layout, map_namespace

# --- versions -------------------------------------------------------------------
FUSE_KERNEL_VERSION: Final = 7
FUSE_KERNEL_MINOR_VERSION: Final = 38  # the newest minor whose layouts are declared here
CUSE_MIN_MINOR_VERSION: Final = 11  # cuse_process_init_reply() refuses a lower minor
FUSE_ROOT_ID: Final = 1

# Reads from the device must offer at least this much (fuse_dev_do_read()).
FUSE_MIN_READ_BUFFER: Final = 8192
CUSE_INIT_INFO_MAX: Final = 4096

# --- opcodes (enum fuse_opcode) ---------------------------------------------------
# Declared between the two snapshots below so the name maps are derived from the
# constants themselves, never maintained as a second list.
_BEFORE_OPCODES: Final = frozenset(globals())
FUSE_LOOKUP: Final = 1
FUSE_FORGET: Final = 2  # no reply
FUSE_GETATTR: Final = 3
FUSE_SETATTR: Final = 4
FUSE_READLINK: Final = 5
FUSE_SYMLINK: Final = 6
FUSE_MKNOD: Final = 8
FUSE_MKDIR: Final = 9
FUSE_UNLINK: Final = 10
FUSE_RMDIR: Final = 11
FUSE_RENAME: Final = 12
FUSE_LINK: Final = 13
FUSE_OPEN: Final = 14
FUSE_READ: Final = 15
FUSE_WRITE: Final = 16
FUSE_STATFS: Final = 17
FUSE_RELEASE: Final = 18
FUSE_FSYNC: Final = 20
FUSE_SETXATTR: Final = 21
FUSE_GETXATTR: Final = 22
FUSE_LISTXATTR: Final = 23
FUSE_REMOVEXATTR: Final = 24
FUSE_FLUSH: Final = 25
FUSE_INIT: Final = 26
FUSE_OPENDIR: Final = 27
FUSE_READDIR: Final = 28
FUSE_RELEASEDIR: Final = 29
FUSE_FSYNCDIR: Final = 30
FUSE_GETLK: Final = 31
FUSE_SETLK: Final = 32
FUSE_SETLKW: Final = 33
FUSE_ACCESS: Final = 34
FUSE_CREATE: Final = 35
FUSE_INTERRUPT: Final = 36
FUSE_BMAP: Final = 37
FUSE_DESTROY: Final = 38
FUSE_IOCTL: Final = 39
FUSE_POLL: Final = 40
FUSE_NOTIFY_REPLY: Final = 41
FUSE_BATCH_FORGET: Final = 42  # no reply
FUSE_FALLOCATE: Final = 43
FUSE_READDIRPLUS: Final = 44
FUSE_RENAME2: Final = 45
FUSE_LSEEK: Final = 46
FUSE_COPY_FILE_RANGE: Final = 47
FUSE_SETUPMAPPING: Final = 48
FUSE_REMOVEMAPPING: Final = 49
FUSE_SYNCFS: Final = 50
FUSE_TMPFILE: Final = 51
FUSE_STATX: Final = 52  # newer than 7.38; named so logs can say what was refused
CUSE_INIT: Final = 4096
_OPCODE_CONSTANTS: Final = {
    name: value
    for name, value in globals().items()
    if name not in _BEFORE_OPCODES and name != "_BEFORE_OPCODES"
}
OPCODE_NAMES: Final = map_namespace("FUSE_", _OPCODE_CONSTANTS) | map_namespace(
    "CUSE_", _OPCODE_CONSTANTS
)

# Opcodes the kernel never expects an answer to.
NO_REPLY_OPCODES: Final = frozenset({FUSE_FORGET, FUSE_BATCH_FORGET})

# Replies to an INTERRUPT carry the interrupted request's unique with this bit set.
FUSE_INT_REQ_BIT: Final = 1 << 0

# --- INIT flags (only the ones we look at) ------------------------------------
FUSE_INIT_EXT: Final = 1 << 30
CUSE_UNRESTRICTED_IOCTL: Final = 1 << 0

# --- OPEN reply flags -------------------------------------------------------------
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_NONSEEKABLE: Final = 1 << 2
FOPEN_NOFLUSH: Final = 1 << 5  # kernel ≥ 5.16: close() sends no FLUSH
FOPEN_FLAG_NAMES: Final = map_namespace("FOPEN_", globals())

# --- ioctl flags --------------------------------------------------------------------
FUSE_IOCTL_COMPAT: Final = 1 << 0
FUSE_IOCTL_UNRESTRICTED: Final = 1 << 1
FUSE_IOCTL_RETRY: Final = 1 << 2
FUSE_IOCTL_32BIT: Final = 1 << 3
FUSE_IOCTL_DIR: Final = 1 << 4
FUSE_IOCTL_COMPAT_X32: Final = 1 << 5
FUSE_IOCTL_FLAG_NAMES: Final = map_namespace("FUSE_IOCTL_", globals())
FUSE_IOCTL_MAX_IOV: Final = 256  # in_iovs + out_iovs of one retry

# --- file modes ---------------------------------------------------------------------
S_IFREG: Final = 0o100000

# --- structures ---------------------------------------------------------------------
FUSE_IN_HEADER = Layout(
    "fuse_in_header",
    (
        ("len", "I"),
        ("opcode", "I"),
        ("unique", "Q"),
        ("nodeid", "Q"),
        ("uid", "I"),
        ("gid", "I"),
        ("pid", "I"),  # the calling *thread* id, in the daemon's pid namespace (0: outside)
        ("total_extlen", "H"),  # extensions appended to the message, in 8-byte units
        ("padding", "H"),
    ),
    size=40,
)

FUSE_OUT_HEADER = Layout(
    "fuse_out_header",
    (("len", "I"), ("error", "i"), ("unique", "Q")),
    size=16,
)

FUSE_INIT_IN = Layout(
    "fuse_init_in",
    (
        ("major", "I"),
        ("minor", "I"),
        ("max_readahead", "I"),
        ("flags", "I"),
        ("flags2", "I"),
        ("unused", "44x"),
    ),
    size=64,
)
FUSE_COMPAT_INIT_IN_SIZE: Final = 16  # kernels before 7.36 send only major..flags

FUSE_INIT_OUT = Layout(
    "fuse_init_out",
    (
        ("major", "I"),
        ("minor", "I"),
        ("max_readahead", "I"),
        ("flags", "I"),
        ("max_background", "H"),
        ("congestion_threshold", "H"),
        ("max_write", "I"),
        ("time_gran", "I"),
        ("max_pages", "H"),
        ("map_alignment", "H"),
        ("flags2", "I"),
        ("unused", "28x"),
    ),
    size=64,
)

CUSE_INIT_IN = Layout(
    "cuse_init_in",
    (("major", "I"), ("minor", "I"), ("unused", "4x"), ("flags", "I")),
    size=16,
)

CUSE_INIT_OUT = Layout(
    "cuse_init_out",
    (
        ("major", "I"),
        ("minor", "I"),
        ("unused", "4x"),
        ("flags", "I"),
        ("max_read", "I"),
        ("max_write", "I"),
        ("dev_major", "I"),  # 0: the kernel picks a free major
        ("dev_minor", "I"),
        ("spare", "40x"),
    ),
    size=72,
)

FUSE_ATTR = Layout(
    "fuse_attr",
    (
        ("ino", "Q"),
        ("size", "Q"),
        ("blocks", "Q"),
        ("atime", "Q"),
        ("mtime", "Q"),
        ("ctime", "Q"),
        ("atimensec", "I"),
        ("mtimensec", "I"),
        ("ctimensec", "I"),
        ("mode", "I"),
        ("nlink", "I"),
        ("uid", "I"),
        ("gid", "I"),
        ("rdev", "I"),
        ("blksize", "I"),
        ("flags", "I"),
    ),
    size=88,
)

FUSE_ATTR_OUT = Layout(
    "fuse_attr_out",
    (("attr_valid", "Q"), ("attr_valid_nsec", "I"), ("dummy", "4x"), *FUSE_ATTR.fields),
    size=104,
)

FUSE_ENTRY_OUT = Layout(
    "fuse_entry_out",
    (
        ("nodeid", "Q"),
        ("generation", "Q"),
        ("entry_valid", "Q"),
        ("attr_valid", "Q"),
        ("entry_valid_nsec", "I"),
        ("attr_valid_nsec", "I"),
        *FUSE_ATTR.fields,
    ),
    size=128,
)

FUSE_GETATTR_IN = Layout(
    "fuse_getattr_in",
    (("getattr_flags", "I"), ("dummy", "4x"), ("fh", "Q")),
    size=16,
)

FUSE_OPEN_IN = Layout("fuse_open_in", (("flags", "I"), ("open_flags", "I")), size=8)

FUSE_OPEN_OUT = Layout(
    "fuse_open_out",
    (("fh", "Q"), ("open_flags", "I"), ("padding", "4x")),
    size=16,
)

FUSE_RELEASE_IN = Layout(
    "fuse_release_in",
    (("fh", "Q"), ("flags", "I"), ("release_flags", "I"), ("lock_owner", "Q")),
    size=24,
)

FUSE_FLUSH_IN = Layout(
    "fuse_flush_in",
    (("fh", "Q"), ("unused", "4x"), ("padding", "4x"), ("lock_owner", "Q")),
    size=24,
)

FUSE_INTERRUPT_IN = Layout("fuse_interrupt_in", (("unique", "Q"),), size=8)

FUSE_FORGET_IN = Layout("fuse_forget_in", (("nlookup", "Q"),), size=8)

FUSE_BATCH_FORGET_IN = Layout(
    "fuse_batch_forget_in",
    (("count", "I"), ("dummy", "4x")),
    size=8,
)

FUSE_FORGET_ONE = Layout("fuse_forget_one", (("nodeid", "Q"), ("nlookup", "Q")), size=16)

FUSE_KSTATFS = Layout(
    "fuse_kstatfs",
    (
        ("blocks", "Q"),
        ("bfree", "Q"),
        ("bavail", "Q"),
        ("files", "Q"),
        ("ffree", "Q"),
        ("bsize", "I"),
        ("namelen", "I"),
        ("frsize", "I"),
        ("padding", "4x"),
        ("spare", "24x"),
    ),
    size=80,
)

FUSE_IOCTL_IN = Layout(
    "fuse_ioctl_in",
    (
        ("fh", "Q"),
        ("flags", "I"),
        ("cmd", "I"),
        ("arg", "Q"),  # the raw ioctl argument: a pointer, or a value passed by value
        ("in_size", "I"),  # bytes of client memory appended after this struct
        ("out_size", "I"),
    ),
    size=32,
)

FUSE_IOCTL_IOVEC = Layout("fuse_ioctl_iovec", (("base", "Q"), ("len", "Q")), size=16)

FUSE_IOCTL_OUT = Layout(
    "fuse_ioctl_out",
    (("result", "i"), ("flags", "I"), ("in_iovs", "I"), ("out_iovs", "I")),
    size=16,
)

# Request body layouts by opcode: the fixed struct that follows fuse_in_header.
# Opcodes absent here carry no struct we decode (LOOKUP: a name; STATFS, DESTROY:
# nothing; anything else is answered ENOSYS without looking at its body).
REQUEST_LAYOUTS: Final[dict[int, Layout]] = {
    FUSE_INIT: FUSE_INIT_IN,
    CUSE_INIT: CUSE_INIT_IN,
    FUSE_GETATTR: FUSE_GETATTR_IN,
    FUSE_OPEN: FUSE_OPEN_IN,
    FUSE_RELEASE: FUSE_RELEASE_IN,
    FUSE_FLUSH: FUSE_FLUSH_IN,
    FUSE_INTERRUPT: FUSE_INTERRUPT_IN,
    FUSE_FORGET: FUSE_FORGET_IN,
    FUSE_BATCH_FORGET: FUSE_BATCH_FORGET_IN,
    FUSE_IOCTL: FUSE_IOCTL_IN,
}
