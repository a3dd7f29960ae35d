"""Who is calling: thread → process, start time, mappings, exec identity, tracepoint check.

The device layer hands us the *thread* id the kernel put in
``fuse_in_header.pid``; everything else is read from ``/proc``, about that
caller only.  Nothing a client sends names a process or a path.

Facts we rely on (proc(5), ``fs/proc/array.c``, ``fs/proc/task_mmu.c``):

* ``/proc/TID`` resolves for any thread id of our pid namespace, not only for
  thread-group leaders (threads are hidden from ``readdir`` of ``/proc`` but
  reachable by name); its ``status`` has the ``Tgid:`` line.
* FUSE reports 0 as the pid of a caller outside the daemon's pid namespace.
* ``/proc/PID/stat``: field 2 is ``(comm)`` and comm may hold spaces and
  parentheses, so fields are counted after the *last* ``)``; field 22 is the
  start time in clock ticks since boot — with the pid it names one process
  for the life of the system (a reused pid gets a later start time).
* ``/proc/PID/maps`` lines are ``start-end perms offset MM:mm inode path``,
  addresses and device numbers in hex, the path escaped (``\\n`` → ``\\012``)
  and suffixed `` (deleted)`` for an unlinked file.  The device is the
  kernel's (major, minor) pair; the stash names it in glibc ``makedev``
  encoding, as upstream's libproc does.  It is *not* ``stat().st_dev`` on
  overlayfs (the mapping shows the lower/upper inode), which is why we never
  stat the path.  Anonymous memory has inode 0.
* ``/proc/PID/auxv`` holds the ELF auxiliary vector as (type, value) pairs
  of the process's word size, ending with ``AT_NULL``.  ``AT_PHDR`` is the
  main executable's program headers (inside its first mapping); ``AT_RANDOM``
  is the address of 16 random bytes on the initial stack.  Both change on
  every ``execve`` when ASLR is on — that is how an exec of the *same*
  binary (same start time, same executable inode) is told apart.  With ASLR
  off (``randomize_va_space=0`` or ``setarch -R``) the token repeats and such
  an exec goes unnoticed until the process exits.
* A pidfd refers to one process, not a pid number: once open, a pid reuse
  can't fool it, and it polls readable when that process exits.

Every read can race with the caller's death; any ``OSError`` from ``/proc``
becomes :class:`RequestRejected` (EINVAL, as upstream answers every failed
ADDDOF), never a crash.
"""

from __future__ import annotations

import bisect
import errno
import os
import re
import select
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from common.errors import RequestRejected
from dtprobed.oslib.fdio import read_all
from dtprobed.oslib.pidfd import pidfd_exited
from dtprobed.oslib.procfs import (
    AT_PHDR,
    MAX_PROC_READ,
    exec_token,
    fsuid_of,
    parse_auxv,
    parse_start_time,
    read_proc,
)
from dtprobed.oslib.procmaps import MapsQuery

assert sys.platform == "linux"

_DELETED: Final = " (deleted)"


def glibc_makedev(major: int, minor: int) -> int:
    """``makedev(major, minor)`` exactly as glibc encodes it (the stash's ``$dev``)."""
    return (
        ((major & 0xFFF) << 8) | (minor & 0xFF) | ((minor & ~0xFF) << 12) | ((major & ~0xFFF) << 32)
    )


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of ``/proc/PID/maps``; ``dev`` in glibc ``makedev`` encoding."""

    start: int
    end: int
    perms: str
    offset: int
    dev: int
    ino: int
    path: str

    @property
    def executable(self) -> bool:
        return len(self.perms) > 2 and self.perms[2] == "x"

    @property
    def file_backed(self) -> bool:
        """A file's pages (inode ≠ 0); ``[heap]``, ``[stack]``, anonymous memory are not."""
        return self.ino != 0 and not self.path.startswith("[")

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.start <= addr < self.end


class AddressSpace:
    """The caller's mappings, with lookup by address.

    A registration looks up two or three mappings of a process that may have
    hundreds.  :meth:`of_process` asks the kernel for each one
    (``PROCMAP_QUERY``, :mod:`dtprobed.oslib.procmaps`) and reads the whole
    ``/proc/PID/maps`` text only if :attr:`mappings` is wanted, or where the
    kernel lacks the ioctl.  From the text (:meth:`from_maps`) only each
    line's address range is decoded up front, for an O(log n) lookup; a line
    is parsed into a :class:`Mapping` when a lookup lands on it.
    """

    def __init__(self, mappings: list[Mapping], pid: int = 0) -> None:
        self.pid = pid  # whose /proc/PID/map_files checks anonymous DOF's code; 0: none
        ordered = sorted(mappings, key=lambda m: m.start)
        self._starts = [m.start for m in ordered]
        self._ends = [m.end for m in ordered]
        self._lines: list[bytes] = []
        self._parsed: dict[int, Mapping] = dict(enumerate(ordered))
        self._query: MapsQuery | None = None
        self._text_read = True

    @classmethod
    def of_process(cls, pid: int) -> AddressSpace:
        """*pid*'s mappings, looked up in the kernel where it can; :meth:`close` it.

        ``OSError`` when the process can't be read, ``ValueError`` on malformed text.
        """
        query = MapsQuery.open(pid)
        if query is None:
            return cls.from_maps(read_proc(f"/proc/{pid}/maps"), pid)
        space = cls([], pid)
        space._query, space._text_read = query, False
        return space

    def close(self) -> None:
        """Close the maps file a kernel lookup holds open (nothing to do for text)."""
        query, self._query = self._query, None
        if query is not None:
            query.close()

    @classmethod
    def from_maps(cls, text: bytes, pid: int = 0) -> AddressSpace:
        """Index *pid*'s ``/proc/PID/maps`` *text*; ``ValueError`` on a malformed or unsorted line."""
        space = cls([], pid)
        lines = text.splitlines()
        starts, ends = space._starts, space._ends
        last_end = 0
        for line in lines:
            lo, dash, rest = line.partition(b"-")
            hi = rest.split(None, 1)[0] if dash and rest else b""
            start, end = int(lo, 16), int(hi, 16)
            if start < last_end or end <= start:
                raise ValueError(f"maps line out of order: {line[:80]!r}")
            starts.append(start)
            ends.append(end)
            last_end = end
        space._lines = lines
        return space

    def _mapping(self, i: int) -> Mapping:
        found = self._parsed.get(i)
        if found is None:
            found = self._parsed[i] = parse_maps(self._lines[i])[0]
        return found

    def _read_text(self) -> None:
        """Kernel lookups: read the whole text now (:attr:`mappings` was asked for)."""
        if self._query is None:
            raise ValueError("the address space is closed")
        try:
            os.lseek(self._query.fd, 0, os.SEEK_SET)
            text = read_all(self._query.fd, MAX_PROC_READ, what=f"/proc/{self.pid}/maps")
        except OSError as err:
            raise _vanished(self.pid, err) from err
        parsed = AddressSpace.from_maps(text, self.pid)
        self._starts, self._ends, self._lines = parsed._starts, parsed._ends, parsed._lines
        self._text_read = True

    @property
    def mappings(self) -> list[Mapping]:
        if not self._text_read:
            self._read_text()
        return [self._mapping(i) for i in range(len(self._starts))]

    def find(self, addr: int) -> Mapping | None:
        if not self._text_read and self._query is None:
            raise ValueError("the address space is closed")
        if self._query is not None:
            try:
                vma = self._query.at(addr)
            except OSError as err:
                raise _vanished(self.pid, err) from err
            if vma is None:
                return None
            return Mapping(
                start=vma.start,
                end=vma.end,
                perms=vma.perms,
                offset=vma.offset,
                dev=glibc_makedev(vma.major, vma.minor),
                ino=vma.inode,
                path=vma.name,
            )
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return self._mapping(i)
        return None

    def object_start(self, m: Mapping) -> Mapping:
        """The first mapping of the object *m* belongs to (its start is the load base).

        With kernel lookups: walk down through the mappings of *m*'s file that
        adjoin it (an ELF object's segments, and the ``---p`` gaps between them,
        are one run), and take the lowest if it maps the file from offset 0 (its
        ELF header).  Anything else (a run that does not start at offset 0, or
        only the text at hand) is :meth:`first_of`, the file's lowest mapping.
        """
        if self._query is not None and m.file_backed:
            first = m
            while first.start > 0:
                below = self.find(first.start - 1)
                if below is None or (below.dev, below.ino) != (m.dev, m.ino):
                    break
                first = below
            if first.offset == 0:
                return first
        return self.first_of(m.dev, m.ino)

    def first_of(self, dev: int, ino: int) -> Mapping:
        """The lowest mapping of file (*dev*, *ino*) (one exists: the caller found one)."""
        for m in self.mappings:
            if (m.dev, m.ino) == (dev, ino) and m.file_backed:
                return m
        raise ValueError(f"no mapping of {dev}-{ino}")

    def check_tracepoints(
        self, addrs: Iterable[int], *, object_key: tuple[int, int] | None
    ) -> None:
        """Every tracepoint must lie in code of the object that registers it.

        *object_key* is the ``(dev, ino)`` of the file the DOF (or the notes) came
        from: each address must lie in an executable mapping of that very file.
        ``None`` is DOF in anonymous memory (libusdt): each address must lie in an
        executable *private* mapping of an unlinked regular file or a memfd,
        which only its holders can reach, never of a named file (uprobes there
        would fire in every process mapping it, as libc's text would).  "Unlinked"
        is read from the file itself through ``/proc/PID/map_files`` (``S_ISREG``,
        ``st_nlink == 0``), not from the `` (deleted)`` of the maps line, which a
        file's own name can carry; for a caller other than root it must be the
        caller's own file (its fsuid's).  Raises :class:`RequestRejected` (EINVAL)
        naming the first address that fails; each mapping is checked once.
        """
        checked: Mapping | None = None
        caller_uid: list[int | None] = []  # read once, when first needed
        for addr in addrs:
            if checked is not None and addr in checked:
                continue  # tracepoints cluster in one text mapping
            m = self.find(addr)
            if m is None:
                raise RequestRejected(errno.EINVAL, f"tracepoint {addr:#x} is not mapped")
            fault = self._code_fault(m, object_key, caller_uid)
            if fault:
                where = m.path or "anonymous memory"
                raise RequestRejected(
                    errno.EINVAL,
                    f"tracepoint {addr:#x} lies in a mapping that is {fault} "
                    f"({m.start:#x}-{m.end:#x} {m.perms} {where})",
                )
            checked = m

    def _code_fault(
        self, m: Mapping, object_key: tuple[int, int] | None, caller_uid: list[int | None]
    ) -> str:
        """Why *m* can't hold the registering object's tracepoints ("" if it can)."""
        if not m.executable:
            return "not executable"
        if not m.file_backed:
            return "not file-backed"
        if object_key is not None:
            return "" if (m.dev, m.ino) == object_key else "not of the registering object"
        if len(m.perms) < 4 or m.perms[3] != "p":
            return "shared, not private (anonymous DOF's code must be private)"
        if self.pid <= 0:
            return "not checkable (no process to read map_files of)"
        if m.dev in fuse_devices(self.pid):
            # a stat there is a request to a server that may never answer (open_object)
            return "of a file on a FUSE file system"
        path = f"/proc/{self.pid}/map_files/{m.start:x}-{m.end:x}"
        try:
            st = os.stat(path)  # follows the link without opening the file (no device open)
        except OSError as err:
            return f"not readable through map_files ({err.strerror})"
        if st.st_ino != m.ino or (st.st_dev != m.dev and not _still_mapped(self.pid, m)):
            return f"replaced meanwhile (now {st.st_dev}-{st.st_ino})"
        if not stat.S_ISREG(st.st_mode):
            return "not of a regular file"
        if st.st_nlink != 0:
            return f"of a named file ({st.st_nlink} links; anonymous DOF's code must be unlinked)"
        # A file unlinked while others still map it (the old libc after an upgrade) is
        # no private code of the caller's: its own memfd or temporary file is its fsuid's.
        if not caller_uid:
            caller_uid.append(fsuid_of(self.pid))
        uid = caller_uid[0]
        if uid is None or (uid != 0 and st.st_uid != uid):
            return f"of a file of uid {st.st_uid}, not the caller's ({uid})"
        return ""


def parse_maps(text: bytes) -> list[Mapping]:
    """Parse ``/proc/PID/maps``; raises ``ValueError`` on a line that doesn't fit."""
    out: list[Mapping] = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            raise ValueError(f"short maps line {line[:80]!r}")
        lo, _, hi = parts[0].partition(b"-")
        major, _, minor = parts[3].partition(b":")
        path = parts[5].decode("utf-8", "surrogateescape") if len(parts) > 5 else ""
        out.append(
            Mapping(
                start=int(lo, 16),
                end=int(hi, 16),
                perms=parts[1].decode("ascii"),
                offset=int(parts[2], 16),
                dev=glibc_makedev(int(major, 16), int(minor, 16)),
                ino=int(parts[4]),
                path=path,
            )
        )
    return out


def _vanished(pid: int, err: OSError | ValueError) -> RequestRejected:
    """The caller could not be read: it died (ENOENT, ESRCH), or something else failed."""
    if isinstance(err, OSError) and err.errno in (errno.ENOENT, errno.ESRCH):
        return RequestRejected(errno.EINVAL, f"cannot read process {pid} (process dead?): {err}")
    return RequestRejected(errno.EINVAL, f"cannot read process {pid}: {err}")


def tgid_of(tid: int) -> int:
    """The process (thread group) of thread *tid*; 0 means outside our pid namespace."""
    if tid <= 0:
        raise RequestRejected(errno.EINVAL, "caller is outside the daemon's pid namespace")
    try:
        status = read_proc(f"/proc/{tid}/status")
    except OSError as err:
        raise _vanished(tid, err) from err
    for line in status.splitlines():
        if line.startswith(b"Tgid:"):
            return int(line.split()[1])
    raise RequestRejected(errno.EINVAL, f"no Tgid in /proc/{tid}/status")


@dataclass
class Caller:
    """One identified caller.  Owns ``pidfd`` until :meth:`take_pidfd` or :meth:`close`."""

    pid: int
    start_time: int
    dev: int  # DOF mapping; 0 for anonymous memory
    ino: int  # DOF mapping's inode; dofhp_dof for anonymous memory
    exec_dev: int
    exec_ino: int
    exec_token: str
    space: AddressSpace
    pidfd: int = -1

    @property
    def dof_object(self) -> tuple[int, int] | None:
        """``(dev, ino)`` of the file the DOF lies in; ``None`` for anonymous memory."""
        return (self.dev, self.ino) if self.dev else None

    def take_pidfd(self) -> int:
        """Hand the pidfd over to the caller of this method (it must close it)."""
        fd, self.pidfd = self.pidfd, -1
        return fd

    def close(self) -> None:
        self.space.close()
        fd, self.pidfd = self.pidfd, -1
        if fd >= 0:
            os.close(fd)

    def still_alive(self) -> bool:
        """True while the process we read is running (its pidfd is not yet readable)."""
        if self.pidfd < 0:
            return False
        return not pidfd_exited(self.pidfd)


def _exec_mapping(pid: int, space: AddressSpace, auxv: dict[int, int]) -> Mapping | None:
    phdr = auxv.get(AT_PHDR)
    if phdr:
        m = space.find(phdr)
        if m is not None and m.file_backed:
            return m
    # Fallback: the first mapping of /proc/PID/exe's path.
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    for m in space.mappings:
        if m.file_backed and m.path in (exe, exe + _DELETED):
            return m
    return None


def identify(tid: int, dof_addr: int) -> Caller:
    """Identify the caller of one ADDDOF whose ``dofhp_dof`` is *dof_addr*.

    Opens a pidfd on the process first, so the result is known to describe
    the process that is still blocked in its ioctl (checked again at the end).
    """

    def key(space: AddressSpace) -> tuple[int, int]:
        dof_map = space.find(dof_addr)
        if dof_map is None:
            raise RequestRejected(errno.EINVAL, f"DOF address {dof_addr:#x} is not mapped")
        if dof_map.file_backed:
            return dof_map.dev, dof_map.ino
        return 0, dof_addr  # stash key 0-<dofhp_dof>, private to this process

    return _identify(tid, key)


@dataclass
class ObjectFile:
    """The ELF object of a HASUSDT caller, opened through ``/proc/PID/map_files``.

    Owns ``fd`` until :meth:`close`.  ``first`` is the object's lowest mapping
    (its start is the load base of an ET_DYN object), ``module`` the basename of
    its path, as upstream names the module.
    """

    fd: int
    size: int
    first: Mapping
    module: str

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def identify_object(tid: int, address: int) -> tuple[Caller, ObjectFile]:
    """Identify the caller of one HASUSDT: the process, and the object *address* lies in.

    The object is opened through ``/proc/PID/map_files/START-END`` of its first
    mapping, which works across mount namespaces and for unlinked files, and
    the opened file's ``(st_dev, st_ino)`` must be the mapping's: a file
    replaced under the name in between is refused.  Nothing of the file is
    interpreted here (the sandboxed parser does that); only its size is taken.
    """
    found: list[Mapping] = []

    def key(space: AddressSpace) -> tuple[int, int]:
        m = space.find(address)
        if m is None:
            raise RequestRejected(errno.EINVAL, f"address {address:#x} is not mapped")
        if not m.file_backed:
            raise RequestRejected(
                errno.EINVAL, f"address {address:#x} is not in a file mapping ({m.path or 'anon'})"
            )
        found.append(space.object_start(m))
        return m.dev, m.ino

    caller = _identify(tid, key)
    try:
        first = found[0]
        obj = open_object(caller.pid, first)
    except BaseException:
        caller.close()
        raise
    return caller, obj


#: A mountinfo line of a FUSE file system: ``ID PARENT MAJ:MIN root mountpoint options
#: [optional fields] - fstype source superoptions``.  No field holds a raw space (the
#: kernel escapes it as ``\\040``), so the first `` - `` of a line is its separator.
_FUSE_MOUNT: Final = re.compile(
    rb"^\S+ \S+ (\d+):(\d+) [^\n]*? - (?:fuse|fuseblk|fuse\.[^ \n]*) ", re.MULTILINE
)


class FuseMountCache:
    """:func:`fuse_devices_in` of each mount namespace, read again only once its mounts changed.

    Reading ``/proc/PID/mountinfo`` costs ~40 µs here (the kernel prints every mount
    of the namespace; more in a container), and every HASUSDT and every anonymous
    DOF's tracepoint check needs it.  An open mountinfo file polls ``POLLPRI`` (and
    ``POLLERR``) once after each mount or unmount in its namespace (proc(5)): the
    first poll after a change reports it, so an entry is used only after a poll
    that reports none, and a change makes it read anew.  A change between the open
    and the read makes the next poll report it: never a stale answer, at worst a
    read too many.  Each entry's open file holds a reference on its namespace, so
    the inode number it is keyed by cannot name another namespace meanwhile; at
    most *capacity* are kept (the least recently used goes, closing its file).
    """

    def __init__(self, capacity: int = 16) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int], tuple[int, frozenset[int]]] = OrderedDict()
        self.reads = 0  # mountinfo reads, for the tests

    def devices(self, pid: int) -> frozenset[int]:
        """The FUSE devices of *pid*'s mount namespace; raises RequestRejected if it's gone."""
        try:
            key = _mount_ns(pid)
            with self._lock:
                cached = self._entries.get(key)
                if cached is not None:
                    if not _mounts_changed(cached[0]):
                        self._entries.move_to_end(key)
                        return cached[1]
                    self._drop(key)
                fd = os.open(f"/proc/{pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    found = fuse_devices_in(read_all(fd, MAX_PROC_READ, what="mountinfo"))
                    self.reads += 1
                    if _mount_ns(pid) != key:  # not the process we looked at: keep nothing
                        return found
                except BaseException:
                    os.close(fd)
                    raise
                self._entries[key] = (fd, found)
                while len(self._entries) > self._capacity:
                    self._drop(next(iter(self._entries)))
                return found
        except OSError as err:
            raise _vanished(pid, err) from err

    def _drop(self, key: tuple[int, int]) -> None:
        fd, _ = self._entries.pop(key)
        os.close(fd)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            while self._entries:
                self._drop(next(iter(self._entries)))


def _mount_ns(pid: int) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/mnt")
    return st.st_dev, st.st_ino


def _mounts_changed(fd: int) -> bool:
    """True once after each mount or unmount in the namespace of open mountinfo *fd*."""
    poller = select.poll()
    poller.register(fd, select.POLLPRI)
    return any(ev & (select.POLLPRI | select.POLLERR) for _, ev in poller.poll(0))


_FUSE_MOUNTS: Final = FuseMountCache()


def fuse_devices(pid: int) -> frozenset[int]:
    """The devices (glibc ``makedev``) of the FUSE file systems mounted where *pid* lives.

    From ``/proc/PID/mountinfo`` (its mount namespace), which asks no file
    system anything; see :func:`fuse_devices_in`.  Read again only after a mount
    or unmount in that namespace (:class:`FuseMountCache`).
    """
    return _FUSE_MOUNTS.devices(pid)


def fuse_devices_in(mountinfo: bytes) -> frozenset[int]:
    """The devices of the ``fuse``, ``fuseblk`` and ``fuse.*`` mounts of *mountinfo* text."""
    return frozenset(
        glibc_makedev(int(m.group(1)), int(m.group(2))) for m in _FUSE_MOUNT.finditer(mountinfo)
    )


def open_object(pid: int, first: Mapping, fuse: frozenset[int] | None = None) -> ObjectFile:
    """Open the file behind mapping *first* of *pid* (``map_files``), checked to be that file.

    An object on a FUSE file system is refused before anything is opened: its
    server answers our open and reads when it likes, and a thread waiting for
    it can be neither cancelled nor killed (docs/security.md).  *fuse*: the
    caller's :func:`fuse_devices`, if already known.
    """
    if first.dev in (fuse_devices(pid) if fuse is None else fuse):
        raise RequestRejected(
            errno.EINVAL,
            f"object {first.path} is on a FUSE file system: not read "
            "(its server could stall the daemon for ever)",
        )
    path = f"/proc/{pid}/map_files/{first.start:x}-{first.end:x}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise _vanished(pid, err) from err
    try:
        st = os.fstat(fd)
        if st.st_ino != first.ino or (st.st_dev != first.dev and not _still_mapped(pid, first)):
            raise RequestRejected(
                errno.EINVAL,
                f"object {first.path} is {st.st_dev}-{st.st_ino}, "
                f"but its mapping says {first.dev}-{first.ino}",
            )
        if not stat.S_ISREG(st.st_mode):
            raise RequestRejected(errno.EINVAL, f"object {first.path} is not a regular file")
        name = first.path.removesuffix(_DELETED)
        module = os.path.basename(name) or name
        return ObjectFile(fd, st.st_size, first, module)
    except BaseException:
        os.close(fd)
        raise


def _still_mapped(pid: int, first: Mapping) -> bool:
    """*first* is still what the process maps at its range (read again after the open).

    On overlayfs before Linux 6.x's backing-file rework (Debian 12's 6.1, seen),
    ``/proc/PID/maps`` names the lower layer's device while the opened file is
    the overlay's: same inode number, another ``st_dev``.  The open went
    through ``map_files`` of that very range, so when the range still maps the
    same (dev, ino) afterwards, the file we hold is the one mapped there.
    """
    try:
        space = AddressSpace.from_maps(read_proc(f"/proc/{pid}/maps"))
    except (OSError, ValueError):
        return False
    now = space.find(first.start)
    return now is not None and (now.start, now.end, now.dev, now.ino) == (
        first.start,
        first.end,
        first.dev,
        first.ino,
    )


def _identify(tid: int, key: Callable[[AddressSpace], tuple[int, int]]) -> Caller:
    """The caller's process, identity and mappings; *key* names the registering mapping."""
    if tid <= 0:
        raise RequestRejected(errno.EINVAL, "caller is outside the daemon's pid namespace")
    try:
        # Most callers are single-threaded: pidfd_open succeeds only on a thread-group
        # leader (EINVAL for other threads), which spares reading /proc/TID/status.
        pid, pidfd = tid, os.pidfd_open(tid)
    except OSError:
        pid = tgid_of(tid)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as err:
            raise _vanished(pid, err) from err
    handed_over = False
    space: AddressSpace | None = None
    try:
        start_time = parse_start_time(read_proc(f"/proc/{pid}/stat"))
        space = AddressSpace.of_process(pid)
        try:
            auxv = parse_auxv(read_proc(f"/proc/{pid}/auxv"))
        except ValueError:
            auxv = {}
        dev, ino = key(space)
        exe = _exec_mapping(pid, space, auxv)
        exec_dev, exec_ino = (exe.dev, exe.ino) if exe is not None else (0, 0)
        token = exec_token(auxv)
        caller = Caller(pid, start_time, dev, ino, exec_dev, exec_ino, token, space, pidfd)
        if not caller.still_alive():
            raise RequestRejected(errno.EINVAL, f"process {pid} exited during registration")
        handed_over = True
        return caller
    except (OSError, ValueError) as err:
        raise _vanished(pid, err) from err
    finally:
        if not handed_over:
            os.close(pidfd)
            if space is not None:
                space.close()
