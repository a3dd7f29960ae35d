"""The floor of a small registration in this design: its hops between processes, and nothing else.

    .venv/bin/python bench/floor_small.py [-n 300] [--rounds 3]

A small registration crosses, in dtprobed, the FUSE device (a Python thread reading
``/dev/fuse``), a hand-off to a worker thread, and three child processes over pipes: the
fetch helper (client memory is read in a killable process, never on the device thread:
the hostile-users issue), the sandboxed parser, the stash writer. This bench builds that
chain with children that do the least their role needs, adding one piece at a time, and
times a client's ioctl through each chain, with the same clients as
``bench/profile_registration.py`` (a fresh fork child per registration, its DOF a 3-probe
DOF in a mapping it inherits):

1. ``fuse``: the device thread answers the ioctl itself (our FUSE protocol code, the
   kernel's round trip);
2. ``+ worker``: the device thread queues the request, a worker thread answers it;
3. ``+ fetch``: the worker asks a fetch child for the DOF (one pipe round trip; the child
   reads it with ``process_vm_readv``, as ours does);
4. ``+ parse``: the worker sends the DOF to a parse child, which decodes the frame and
   answers a frame of 9 records (3 probes, their tracepoints and arguments), decoded by
   the worker;
5. ``+ write``: the worker sends a 700-byte frame to a writer child, which decodes it and
   answers (no stash);
6. ``+ stash calls``: the writer child also makes a writer's system calls for a new
   process's 3-probe registration before it answers (54: directories, xattrs, files,
   links, the generation symlink, as our writer made them before the fourth pass of
   issue 13, less its reads), and the removal's after (34, as the exit prune) — bare
   ``os`` calls, no checks, no undo;
7. ``+ identify``: while the fetch child reads, the worker makes the identification's
   system calls (``pidfd_open``, ``/proc/PID/stat`` and ``auxv``, two ``PROCMAP_QUERY``).

8. ``HASUSDT``: the by-value ioctl of ``bench/profile_registration.py``'s HASUSDT case
   (its notes object, mapped in every client); no fetch child (the daemon reads the
   object itself) and, as in ours for a fork child, no parse: the identification's
   system calls (the object's mapping walked down to its first, its file opened through
   ``map_files``, the five reads our parse cache repeats), then chain 6's writer child
   with two raw blocks.

Chain 7 runs again without the parse (a fork child's registration, which our parse cache
answers), and both again with the fewest system calls upstream's layout needs (30 and 18,
paths relative to one held directory: a lower bound, not a safe writer). Then the real
daemon, through the same kind of clients: ``small fresh`` (compare with chain 7),
``small fork`` (compare with chain 7 without the parse) and ``HASUSDT 3 probes`` (compare
with chain 8). All run one after the other in each round, state on tmpfs. Printed: each
one's p50, and the CPU time per registration of all its processes (the server and its
children; for dtprobed, all of its processes, the exit prune included), per round and as
the median over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import shlex
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from bench.bench_receiver import Bench

_LEN = struct.Struct("<I")
_FETCH_REQUEST = struct.Struct("<iQ")  # tid, address


# --- the children (run as ``python -I bench/floor_small.py --child ROLE``) ---------------


def _read_frame(fd: int) -> bytes | None:
    """One length-prefixed frame; small frames come in one read."""
    data = os.read(fd, 1 << 16)
    if not data:
        return None
    (size,) = _LEN.unpack_from(data)
    while len(data) < 4 + size:
        more = os.read(fd, 4 + size - len(data))
        if not more:
            return None
        data += more
    return data[4:]


def _child_fetch() -> None:
    sys.path.insert(0, str(ROOT))
    from common.dof_abi import DOF_HDR
    from dtprobed.device.caller_memory import read_memory

    while True:
        req = os.read(0, _FETCH_REQUEST.size)
        if not req:
            return
        tid, address = _FETCH_REQUEST.unpack(req)
        # as ours: the header, then what its dofh_loadsz says (bounded)
        header = read_memory(tid, address, DOF_HDR.size)
        size = min(int(DOF_HDR.unpack_from(header).loadsz), 1 << 20)
        data = header + read_memory(tid, address + DOF_HDR.size, size - DOF_HDR.size)
        os.write(1, _LEN.pack(len(data)) + data)


def _child_parse() -> None:
    import msgspec

    encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode
    while True:
        frame = _read_frame(0)
        if frame is None:
            return
        _helper, dof = decode(frame)
        pid = os.getpid()
        records = []
        for i in range(3):
            records.append(["probe", "bench", "a.out", "main", f"p{i}", 1, 1, 0])
            records.append(["tracepoint", 0x1000 + 16 * i, 0, len(dof)])
            records.append(["args", ["int"], ["int"], [0], pid])
        answer = encode(records)
        os.write(1, _LEN.pack(len(answer)) + answer)


def _stash_calls(base: int, pid: int, blocks: int = 1) -> None:
    """The system calls our writer made for a new process's 3-probe registration
    (*blocks* raw blocks: 2 for a ``.note.usdt`` object, its notes and ``.rodata``)."""
    name = str(pid)
    os.mkdir(name, dir_fd=base)
    pdir = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base)
    for attr, value in (
        (b"start_time", b"3619754"),
        (b"token", b"at_random:7ffd4180"),
        (b"uid", b"0"),
    ):
        os.setxattr(pdir, b"trusted.dtprobed." + attr, value)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

    def new_file(dir_fd: int, fname: str, data: bytes) -> None:
        fd = os.open(fname, flags, 0o644, dir_fd=dir_fd)
        if data:
            os.write(fd, data)
        os.close(fd)

    new_file(pdir, "next-gen", b"")
    new_file(pdir, "exec-mapping", b"65024-26723")
    os.mkdir("27-9080", dir_fd=pdir)
    mdir = os.open("27-9080", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pdir)
    for own, shared in _raw_names(pid, blocks):
        raw = os.open(".", os.O_WRONLY | os.O_TMPFILE, 0o644, dir_fd=base)
        os.write(raw, b"\0" * 456)
        os.link(f"/proc/self/fd/{raw}", shared, dst_dir_fd=base, follow_symlinks=True)
        os.close(raw)
        os.link(shared, own, src_dir_fd=base, dst_dir_fd=mdir)
    new_file(mdir, "dh", b"\0" * 80)
    os.mkdir("parsed", dir_fd=mdir)
    parsed = os.open("parsed", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=mdir)
    held = []
    parent = base
    for part in (f"p{pid}", "bench", "a.out"):
        os.mkdir(part, dir_fd=parent)
        parent = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        held.append(parent)
    os.mkdir("main", dir_fd=parent)
    for i in range(3):
        pname = f"bench:a.out:main:p{i}"
        new_file(parsed, pname, b"\3" * 140)
        os.link(pname, f"main/p{i}", src_dir_fd=parsed, dst_dir_fd=parent)
    new_file(parsed, "version", b"\3\0\0\0\0\0\0\0")
    for fd in (*held, parsed, mdir):
        os.close(fd)
    ng = os.open("next-gen", os.O_RDWR | os.O_NOFOLLOW, dir_fd=pdir)
    os.symlink("27-9080", "0", dir_fd=pdir)
    os.ftruncate(ng, 1)
    os.close(ng)
    os.close(pdir)


def _raw_names(pid: int, blocks: int) -> list[tuple[str, str]]:
    """(name in the mapping directory, shared name) of each raw block."""
    return [("raw" if i == 0 else f"raw-{i}", f"raw-{pid}-{i}") for i in range(blocks)]


def _stash_removal(base: int, pid: int, blocks: int = 1) -> None:
    """The removal of what :func:`_stash_calls` made (the exit prune's system calls)."""
    name = str(pid)
    pdir = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base)
    os.unlink("0", dir_fd=pdir)
    mdir = os.open("27-9080", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pdir)
    parsed = os.open("parsed", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=mdir)
    pdirs = os.open(f"p{pid}", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base)
    prv = os.open("bench", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pdirs)
    mod = os.open("a.out", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=prv)
    fun = os.open("main", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=mod)
    for i in range(3):
        os.unlink(f"p{i}", dir_fd=fun)
        os.unlink(f"bench:a.out:main:p{i}", dir_fd=parsed)
    for fd, part, parent in ((fun, "main", mod), (mod, "a.out", prv), (prv, "bench", pdirs)):
        os.close(fd)
        os.rmdir(part, dir_fd=parent)
    os.close(pdirs)
    os.rmdir(f"p{pid}", dir_fd=base)
    os.unlink("version", dir_fd=parsed)
    os.close(parsed)
    os.rmdir("parsed", dir_fd=mdir)
    os.unlink("dh", dir_fd=mdir)
    for own, shared in _raw_names(pid, blocks):
        os.unlink(own, dir_fd=mdir)
        os.unlink(shared, dir_fd=base)
    os.close(mdir)
    os.rmdir("27-9080", dir_fd=pdir)
    os.unlink("exec-mapping", dir_fd=pdir)
    os.unlink("next-gen", dir_fd=pdir)
    os.close(pdir)
    os.rmdir(name, dir_fd=base)


def _minimal_stash_calls(base: int, pid: int) -> None:
    """The fewest system calls upstream's layout needs for the same registration: paths
    relative to one held directory (no confinement), no xattrs of ours, no exec-mapping,
    an empty next-gen by ``mknod``: a lower bound, not a safe writer."""
    p, q = str(pid), f"p{pid}"
    m = f"{p}/27-9080"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

    def new_file(fname: str, data: bytes) -> None:
        fd = os.open(fname, flags, 0o644, dir_fd=base)
        os.write(fd, data)
        os.close(fd)

    os.mkdir(p, dir_fd=base)
    os.mknod(f"{p}/next-gen", 0o644 | stat.S_IFREG, dir_fd=base)
    os.mkdir(m, dir_fd=base)
    new_file(f"{m}/raw", b"\0" * 456)
    new_file(f"{m}/dh", b"\0" * 80)
    os.mkdir(f"{m}/parsed", dir_fd=base)
    fun = f"{q}/bench/a.out/main"
    for d in (q, f"{q}/bench", f"{q}/bench/a.out", fun):
        os.mkdir(d, dir_fd=base)
    for i in range(3):
        parsed = f"{m}/parsed/bench:a.out:main:p{i}"
        new_file(parsed, b"\3" * 140)
        os.link(parsed, f"{fun}/p{i}", src_dir_fd=base, dst_dir_fd=base)
    new_file(f"{m}/parsed/version", b"\3\0\0\0\0\0\0\0")
    os.symlink("27-9080", f"{p}/0", dir_fd=base)


def _minimal_stash_removal(base: int, pid: int) -> None:
    p, q = str(pid), f"p{pid}"
    m = f"{p}/27-9080"
    fun = f"{q}/bench/a.out/main"
    os.unlink(f"{p}/0", dir_fd=base)
    for i in range(3):
        os.unlink(f"{fun}/p{i}", dir_fd=base)
        os.unlink(f"{m}/parsed/bench:a.out:main:p{i}", dir_fd=base)
    for d in (fun, f"{q}/bench/a.out", f"{q}/bench", q):
        os.rmdir(d, dir_fd=base)
    os.unlink(f"{m}/parsed/version", dir_fd=base)
    os.rmdir(f"{m}/parsed", dir_fd=base)
    for f in (f"{m}/dh", f"{m}/raw"):
        os.unlink(f, dir_fd=base)
    os.rmdir(m, dir_fd=base)
    os.unlink(f"{p}/next-gen", dir_fd=base)
    os.rmdir(p, dir_fd=base)


def _child_write(stash_dir: str | None, minimal: bool, blocks: int) -> None:
    import msgspec

    decode = msgspec.msgpack.decode
    base = os.open(stash_dir, os.O_RDONLY | os.O_DIRECTORY) if stash_dir else -1
    write, remove = (
        (_minimal_stash_calls, _minimal_stash_removal)
        if minimal
        else (_stash_calls, _stash_removal)
    )
    while True:
        frame = _read_frame(0)
        if frame is None:
            return
        pid, _records, _padding = decode(frame)
        if base >= 0:
            write(base, pid) if minimal else _stash_calls(base, pid, blocks)
        os.write(1, b"\3\0\0\0\222\1\0")
        if base >= 0:
            remove(base, pid) if minimal else _stash_removal(base, pid, blocks)


# --- the chain in the bench process -------------------------------------------------------


class _Child:
    def __init__(self, role: str, *extra: str) -> None:
        argv = [sys.executable, "-I", __file__, "--child", role, *extra]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.to, self.frm = self.proc.stdin.fileno(), self.proc.stdout.fileno()

    def exchange(self, data: bytes) -> bytes:
        os.write(self.to, data)
        answer = _read_frame(self.frm)
        if answer is None:
            raise RuntimeError("child ended")
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(5)


def _process_calls(tid: int) -> int:
    """What both identifications start with: a pidfd (returned), ``stat`` and ``auxv``."""
    from dtprobed.oslib.procfs import read_proc

    pidfd = os.pidfd_open(tid)
    read_proc(f"/proc/{tid}/stat")
    read_proc(f"/proc/{tid}/auxv")
    return pidfd


def _identify_calls(tid: int, addrs: tuple[int, ...]) -> None:
    from dtprobed.oslib.procmaps import MapsQuery

    pidfd = _process_calls(tid)
    query = MapsQuery.open(tid)
    if query is not None:
        for addr in addrs:
            query.at(addr)
        query.close()
    os.close(pidfd)


def _identify_object_calls(tid: int, address: int) -> None:
    """HASUSDT's identification: the process, the object's mapping (walked down to its
    first), its file through map_files, and the reads our parse cache repeats."""
    from dtprobed.oslib.procmaps import MapsQuery

    pidfd = _process_calls(tid)
    query = MapsQuery.open(tid)
    assert query is not None
    vma = query.at(address)
    assert vma is not None
    first = vma
    while (below := query.at(first.start - 1)) is not None and below.inode == vma.inode:
        first = below
    query.close()
    fd = os.open(f"/proc/{tid}/map_files/{first.start:x}-{first.end:x}", os.O_RDONLY)
    os.fstat(fd)
    for size in (64, 2048, 512, 256, 256):  # ELF header, sections, names, notes, .rodata
        os.pread(fd, size, 0)
    os.close(fd)
    os.close(pidfd)


class FloorChain:
    """A FUSE file served by the least our design's chain of processes can do."""

    def __init__(
        self,
        path: str,
        level: int,
        stash_dir: str,
        parse: bool = True,
        minimal: bool = False,
    ) -> None:
        from common.dof_abi import DOF_HELPER
        from dtprobed.device.fusefile import FuseFileDevice

        self.level, self.parse = level, parse
        self._dof_helper = DOF_HELPER
        self._queue: queue.SimpleQueue[tuple[object, Callable[[int], None]] | None] = (
            queue.SimpleQueue()
        )
        self._children: list[_Child] = []
        # level 8, HASUSDT: no fetch (the object is read here) and, as for a fork child
        # in ours, no parse; two raw blocks
        self.fetch = _Child("fetch") if 3 <= level <= 7 else None
        self.parser = _Child("parse") if 4 <= level <= 7 and parse else None
        self.writer = (
            _Child(
                "write",
                *(["--stash", stash_dir] if level >= 6 else []),
                *(["--minimal"] if minimal else []),
                *(["--blocks", "2"] if level == 8 else []),
            )
            if level >= 5
            else None
        )
        self._children = [c for c in (self.fetch, self.parser, self.writer) if c is not None]
        self._stop = threading.Event()
        handler = self._on_device if level == 1 else self._enqueue
        log = logging.getLogger("floor")
        log.setLevel(logging.ERROR)  # "mounting in our own namespace" is expected here
        self.device = FuseFileDevice.open(path, handler, max_dof_size=1 << 20, log=log)
        self._threads = [threading.Thread(target=self.device.run, args=(self._stop,))]
        if level >= 2:
            self._threads.append(threading.Thread(target=self._work))
        for t in self._threads:
            t.start()

    def _on_device(self, request: object, reply: Callable[[int], None]) -> None:
        reply(0)

    def _enqueue(self, request: object, reply: Callable[[int], None]) -> None:
        self._queue.put((request, reply))

    def _work(self) -> None:
        import msgspec

        encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode
        while (item := self._queue.get()) is not None:
            request, reply = item
            try:
                self._serve(request, encode, decode)
            except Exception:
                reply(-5)  # EIO: the client's fork_register raises, the bench stops
                raise
            reply(0)

    def _serve(
        self, request: object, encode: Callable[..., bytes], decode: Callable[..., object]
    ) -> None:
        tid = request.tid  # type: ignore[attr-defined]
        helper = request.helper  # type: ignore[attr-defined]
        records: object = []
        if self.level == 8:
            _identify_object_calls(tid, request.address)  # type: ignore[attr-defined]
        if self.fetch is not None:
            fields = self._dof_helper.unpack_from(helper)
            os.write(self.fetch.to, _FETCH_REQUEST.pack(tid, fields.dof))
            if self.level >= 7:
                _identify_calls(tid, (fields.dof, fields.dof + 0x100))
            dof = _read_frame(self.fetch.frm)
            if self.parser is not None:
                frame = encode([helper, dof])
                records = decode(self.parser.exchange(_LEN.pack(len(frame)) + frame))
        if self.writer is not None:
            frame = encode([tid, records, b"\0" * (700 - 64)])
            self.writer.exchange(_LEN.pack(len(frame)) + frame)

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        for t in self._threads:
            t.join(5)
        self.device.close()
        for c in self._children:
            c.close()


#: (label, chain level, parse, minimal stash calls), in the order they run in a round.
CHAINS = [
    ("1 fuse", 1, True, False),
    ("2 + worker", 2, True, False),
    ("3 + fetch", 3, True, False),
    ("4 + parse", 4, True, False),
    ("5 + write", 5, True, False),
    ("6 + stash calls", 6, True, False),
    ("7 + identify", 7, True, False),
    ("7 without the parse", 7, False, False),
    ("7, minimal stash calls", 7, True, True),
    ("7, minimal, without the parse", 7, False, True),
    ("8 HASUSDT (no fetch, no parse)", 8, False, False),
]


def _child_server(args: argparse.Namespace) -> None:
    """Serve a chain until stdin ends (a process of its own: a server in the process
    that forks the clients would pay their copy-on-write faults)."""
    chain = FloorChain(args.path, args.level, args.stash, not args.no_parse, args.minimal)
    try:
        os.write(1, b"ready\n")
        while os.read(0, 1):
            pass
    finally:
        chain.close()


def _tree_cpu(pid: int) -> float:
    """CPU seconds of *pid* and its children (the chain's server and its three)."""
    from bench.profile_registration import cpu_seconds

    total = cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            total += sum(cpu_seconds(int(c)) for c in children)
    return total


class FloorServer:
    """A chain served on *path* by a process of its own (``--child server``)."""

    def __init__(
        self, path: str, stash_dir: str, level: int, parse: bool = True, minimal: bool = False
    ) -> None:
        argv = [sys.executable, __file__, "--child", "server", "--stash", stash_dir]
        argv += ["--path", path, "--level", str(level)]
        argv += [*(["--no-parse"] if not parse else []), *(["--minimal"] if minimal else [])]
        self.path = path
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != b"ready\n":
            self.stop()
            raise RuntimeError(f"chain {level} on {path} did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # a broken chain: leave no mount behind
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["umount", "-l", self.path], check=False)


def _measure_chain(
    tmp: Path, helper: bytearray, level: int, parse: bool, minimal: bool, count: int
) -> tuple[list[float], float]:
    """The clients' ioctl times through one chain, and its CPU seconds per registration."""
    from bench.profile_registration import HASUSDT, fork_register, timed_ioctl
    from common.ioctl import DTRACEHIOC_ADDDOF

    name = f"{level}-{int(parse)}-{int(minimal)}"
    stash = tmp / f"stash-{name}"
    stash.mkdir()
    path = str(tmp / f"helper-{name}")
    server = FloorServer(path, str(stash), level, parse, minimal)
    try:

        def register() -> tuple[float, int]:
            if level == 8:  # the notes object profile_registration maps (cases())
                return timed_ioctl(path, HASUSDT, _notes_address())
            return timed_ioctl(path, DTRACEHIOC_ADDDOF, bytearray(helper))

        fork_register(register, 20)
        before = _tree_cpu(server.pid)
        times = fork_register(register, count)
        return times, (_tree_cpu(server.pid) - before) / count
    finally:
        server.stop()


def _map_notes_object() -> None:
    """Map the notes object as profile_registration's HASUSDT case does (kept mapped)."""
    import mmap

    from bench.profile_registration import _KEEP, NOTES_OBJECT

    if not _KEEP:
        with open(NOTES_OBJECT, "rb") as f:
            _KEEP.append(
                mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC)
            )


def _notes_address() -> int:
    """An address in the text of the notes object of ``bench/profile_registration.py``
    (mapped in this process, so in every fork child, by its HASUSDT case's start)."""
    from bench.profile_registration import NOTES_OBJECT, _mapping_start

    return _mapping_start(NOTES_OBJECT) + 0x100


def _measure_daemon(tmp: Path, bench: Bench, count: int) -> dict[str, tuple[list[float], float]]:
    """The real daemon's small cases: ioctl times, and CPU seconds per registration
    (all its processes, the exit prune included)."""
    from bench.profile_registration import cases, cpu_by_role, fork_register
    from tests.support.daemon import finish, start_daemon

    work = tmp / "daemon"
    work.mkdir()
    daemon = start_daemon(work, debug=False)
    out: dict[str, tuple[list[float], float]] = {}
    seen: dict[int, str] = {}
    try:
        for label, _n, register in cases(bench, str(daemon.device), work, True):
            if label not in ("small fresh", "small fork", "HASUSDT 3 probes"):
                continue
            start = getattr(register, "start", None)
            if start is not None:
                start()
            fork_register(register, 20)
            daemon.wait_for("prune", lambda: daemon.stash_pids() == [], 60)
            before = cpu_by_role(daemon, seen)
            times = fork_register(register, count)
            daemon.wait_for("prune", lambda: daemon.stash_pids() == [], 60)
            after = cpu_by_role(daemon, seen)
            cpu = sum(after.get(p, 0.0) - before.get(p, 0.0) for p in seen) / count
            out[f"dtprobed {label}"] = (times, cpu)
    finally:
        finish(daemon)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=300, help="registrations per chain and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--stash", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--level", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-parse", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--minimal", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "fetch":
        return _child_fetch()
    if args.child == "parse":
        return _child_parse()
    if args.child == "write":
        return _child_write(args.stash, args.minimal, args.blocks)
    if args.child == "server":
        return _child_server(args)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}", flush=True)
    from bench.bench_receiver import Bench, small_dof

    p50s: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    keep = tempfile.TemporaryDirectory(prefix="floor-objects-", dir=args.dir)
    # one Bench per process: it maps the clients' code at a fixed address
    bench = Bench(Path("/nonexistent"), Path(keep.name))
    helper = bench.mapped_helper(small_dof())
    _map_notes_object()
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="floor-", dir=args.dir) as tmp:
            row: dict[str, tuple[list[float], float]] = {}
            for label, level, parse, minimal in CHAINS:
                row[label] = _measure_chain(Path(tmp), helper, level, parse, minimal, args.n)
            row.update(_measure_daemon(Path(tmp), bench, args.n))
            print(f"round {r + 1} (p50 ms, CPU ms per registration):", flush=True)
            for label, (times, cpu) in row.items():
                p50s.setdefault(label, []).append(statistics.median(times))
                cpus.setdefault(label, []).append(cpu)
                print(f"  {label:32s} {statistics.median(times) * 1e3:7.3f}  {cpu * 1e3:7.3f}")
    print(f"median over {args.rounds} rounds (n={args.n} a round): p50 ms, CPU ms per registration")
    for label, values in p50s.items():
        p50, cpu = statistics.median(values), statistics.median(cpus[label])
        print(f"  {label:32s} {p50 * 1e3:7.3f}  {cpu * 1e3:7.3f}")
    keep.cleanup()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
