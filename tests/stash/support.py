"""Shared helpers for the stash tests: registrations, record streams, real processes, tree snapshots."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from common.dof_build import ProbeSpec, ProviderSpec, build_dof, build_helper
from common.records import (
    ArgsMap,
    ArgsNative,
    ArgsXlat,
    Eof,
    Probe,
    Provider,
    ResultRecord,
    Tracepoint,
)
from common.stash_protocol import RawBlock, Registration
from dtprobed.oslib.procfs import current_exec_token
from dtprobed.oslib.procfs import start_time_of as proc_start_time

EXEC_DEV = 64768  # fd:00
EXEC_INO = 1234


def records_for(
    provider: str, probes: Sequence[tuple[str, str, str, int]], *, args: bool = False
) -> list[ResultRecord]:
    """A record stream: one provider, probes (mod, fun, prb, first tracepoint address)."""
    out: list[ResultRecord] = [Provider(name=provider, nprobes=len(probes))]
    for mod, fun, prb, addr in probes:
        if args:
            out.append(Probe(mod=mod, fun=fun, prb=prb, ntp=2, nargc=2, xargc=1))
            out += [ArgsNative(args=["int", "char *"]), ArgsXlat(args=["string"]), ArgsMap(map=[1])]
            out += [
                Tracepoint(addr=addr, is_enabled=False),
                Tracepoint(addr=addr + 16, is_enabled=True),
            ]
        else:
            out.append(Probe(mod=mod, fun=fun, prb=prb, ntp=1, nargc=0, xargc=0))
            out.append(Tracepoint(addr=addr, is_enabled=False))
    out.append(Eof())
    return out


def many_records(n: int, provider: str = "bench") -> list[ResultRecord]:
    return records_for(
        provider, [("a.out", f"f{i // 100}", f"p{i}", 0x401000 + 16 * i) for i in range(n)]
    )


WORKED = records_for("test_prov", [("test", "main", "go", 0x401136)])


def dof_bytes(tag: str = "x") -> bytes:
    """Some valid DOF (the writer never parses it; the bytes only need to be stable)."""
    return build_dof([ProviderSpec(tag, [ProbeSpec("main", "go", [0x10])])]).data


def registration(
    pid: int,
    start_time: int,
    *,
    dev: int = EXEC_DEV,
    ino: int = 99,
    exec_ino: int = EXEC_INO,
    token: str | None = None,
    dof: bytes | None = None,
) -> Registration:
    """A registration for *pid*; *token* defaults to the live process's real exec
    token (prune_dead compares it), or "tok1" for a pid that is not running."""
    if token is None:
        token = current_exec_token(pid) or "tok1"
    return Registration(
        pid=pid,
        start_time=start_time,
        dev=dev,
        ino=ino,
        exec_dev=EXEC_DEV,
        exec_ino=exec_ino,
        exec_token=token,
        helper=build_helper(b"a.out", 0x400000, 0x400000),
        raw=[RawBlock(0, dof if dof is not None else dof_bytes())],
    )


@dataclass
class Proc:
    pid: int
    start_time: int
    popen: subprocess.Popen[bytes]


def exec_finished(pid: int, name: str) -> bool:
    """*pid* runs *name* and the kernel has written its auxv.

    Popen may return while the child's exec is still under way (vfork); read
    before the auxv is there, the exec token would differ from the next read
    and look like an exec between two registrations.
    """
    return bool(current_exec_token(pid)) and os.readlink(f"/proc/{pid}/exe").endswith(name)


@contextmanager
def sleepers(n: int) -> Iterator[list[Proc]]:
    """n real processes (``sleep``), with their pid and /proc start time; killed afterwards."""
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(n)]
    try:
        out = []
        for p in procs:
            deadline = time.monotonic() + 10
            while not exec_finished(p.pid, "sleep"):
                assert time.monotonic() < deadline, f"sleep {p.pid} never started"
                time.sleep(0.001)
            st = proc_start_time(p.pid)
            assert st is not None
            out.append(Proc(p.pid, st, p))
        yield out
    finally:
        for p in procs:
            p.kill()
            p.wait()


def snapshot(
    root: str, *, with_inodes: bool = False, with_xattrs: bool = False
) -> dict[str, tuple[object, ...]]:
    """Every path under *root*: type, mode, size, link count, symlink target or bytes
    (and, if asked, the inode number and every extended attribute with its value)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entry: tuple[object, ...] = ("symlink", mode, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                entry = ("dir", mode)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    data = f.read()
                entry = ("file", mode, st.st_size, st.st_nlink, data.hex())
            else:
                entry = ("other", mode)
            if with_inodes:
                entry += (st.st_ino,)
            if with_xattrs:
                names = sorted(os.listxattr(full, follow_symlinks=False))
                entry += (
                    tuple((n, os.getxattr(full, n, follow_symlinks=False).hex()) for n in names),
                )
            out[rel] = entry
        if with_xattrs and dirpath == root:
            st = os.lstat(root)
            names = sorted(os.listxattr(root))
            out["."] = ("dir", stat.S_IMODE(st.st_mode), tuple(names))
    return out


def parsed(reg: Registration) -> list[ResultRecord]:
    """What the real parser makes of *reg* (tests only: the writer never parses)."""
    from parserd.dof_parse import parse_dof

    return list(parse_dof(reg.helper, reg.raw[0].data))


def normalized(
    tree: dict[str, tuple[object, ...]], pids: dict[int, str]
) -> dict[str, list[object]]:
    """Replace real pids by placeholders in paths, so golden trees are stable."""
    out: dict[str, list[object]] = {}
    for path, entry in sorted(tree.items()):
        for pid, name in pids.items():
            path = path.replace(str(pid), name)
        out[path] = list(entry)
    return dict(sorted(out.items()))
