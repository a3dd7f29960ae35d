"""HASUSDT registrations of the committed ``.note.usdt`` objects, compared with upstream.

The objects of ``tests/parser/fixtures/notes/`` (built by dtrace 2.0.7's ``dtrace -G``) are
mapped into a Python process — ONE mapping of the whole file, ``PROT_READ|PROT_EXEC``, so
that the object's first mapping is also its text, as for these ``-z noseparate-code``
objects under ld.so — which sends ``ioctl(fd, DTRACEHIOC_HASUSDT, address inside it)``
(the address by value, through ctypes) to a private FUSE-mode daemon. The stash tree is
then compared with what upstream's own dtprobed 2.0.7 wrote for the same objects
(``tests/golden/upstream-2.0.7/<scenario>/run1/``), entry by entry: type, mode, link
count, size, hard-link structure, symlink targets, and bytes, with these mappings:

* paths: upstream's pid → ours; upstream's ``$dev-$ino`` of the object → ours;
* tracepoint addresses in parsed files: ``site + base``; upstream's base was its mapping's
  start (ET_DYN), ours is ours; ET_EXEC objects have base 0 (ours is mapped at its link
  address, as ld.so would);
* ``dh``: upstream leaves stack garbage after the module name's NUL (masked); ours must be
  zeros there; ``dofhp_addr`` = the base (0 for ET_EXEC);
* ``exec-mapping``: ``$dev-$ino`` of the main executable, here the Python interpreter's.

Directory sizes are compared too: both stashes are on tmpfs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon import DaemonHandle, finish, start_daemon
from tests.support.stash_view import file_key

REPO = Path(__file__).resolve().parents[2]
NOTES = REPO / "tests" / "parser" / "fixtures" / "notes"
GOLDEN = REPO / "tests" / "golden" / "upstream-2.0.7"
HASUSDT = 0x4008D804
DIT_TRACEPOINT = 2

#: The registering process: maps argv[1] whole (PROT_READ|PROT_EXEC, MAP_PRIVATE; at
#: argv[3] if not 0), sends HASUSDT with argv[4] (an offset in the mapping) + the mapping's
#: address, prints {"pid", "base", "gen", "errno"}; exits at end of input.
CHILD = r"""
import ctypes, json, mmap, os, sys
path, helper, at, inside = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
fd = os.open(path, os.O_RDONLY)
flags = mmap.MAP_PRIVATE | (0x100000 if at else 0)  # MAP_FIXED_NOREPLACE
base = libc.mmap(at or None, os.path.getsize(path), mmap.PROT_READ | mmap.PROT_EXEC, flags, fd, 0)
os.close(fd)
if base in (None, ctypes.c_void_p(-1).value) or (at and base != at):
    raise SystemExit(f"mmap failed: {os.strerror(ctypes.get_errno())}")
hfd = os.open(helper, os.O_RDWR)
gen = libc.ioctl(hfd, 0x4008D804, base + inside)
err = ctypes.get_errno() if gen < 0 else 0
os.close(hfd)
print(json.dumps({"pid": os.getpid(), "base": base, "gen": gen, "errno": err}), flush=True)
sys.stdin.read()
"""


@dataclass(frozen=True)
class Elf:
    """What the test needs of an object: its type, where it is mapped, an address in it."""

    et_exec: bool
    link_base: int  # p_vaddr - p_offset of the first PT_LOAD (0 for ET_DYN)
    entry: int  # e_entry (link-time)


def read_elf(path: Path) -> Elf:
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, path
    (e_type,) = struct.unpack_from("<H", data, 16)
    (entry, phoff) = struct.unpack_from("<QQ", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr = struct.unpack_from("<IIQQ", data, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            return Elf(e_type == 2, p_vaddr - p_offset, entry)
    raise AssertionError(f"{path} has no PT_LOAD")


class Registrant:
    """A process that registers one object with HASUSDT and lives until ``exit()``."""

    def __init__(self, obj: Path, helper: Path) -> None:
        elf = read_elf(obj)
        at = elf.link_base if elf.et_exec else 0
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-I", "-c", CHILD, str(obj), str(helper), str(at)),
                str(elf.entry - elf.link_base),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the registering process failed (exit {self.proc.wait()})"
        answer = json.loads(line)
        self.pid: int = answer["pid"]
        self.gen: int = answer["gen"]
        self.errno: int = answer["errno"]
        #: dofhp_addr and the tracepoints' base: the mapping for ET_DYN, 0 for ET_EXEC.
        self.base: int = 0 if elf.et_exec else answer["base"]
        self.exe_key = file_key(Path(f"/proc/{self.pid}/exe"))

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


@dataclass(frozen=True)
class Entry:
    kind: str  # d, f, l
    mode: int
    nlink: int
    size: int
    ino: int
    content: bytes | str | None  # file bytes, symlink target


def read_tree(top: Path) -> dict[str, Entry]:
    """Every entry under ``top`` (``.`` for itself)."""
    out: dict[str, Entry] = {}
    for dirpath, dirs, files in os.walk(top):
        for name in [".", *dirs, *files] if dirpath == str(top) else [*dirs, *files]:
            path = Path(dirpath) / name if name != "." else top
            rel = "." if name == "." else str(path.relative_to(top))
            st = os.lstat(path)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
            content: bytes | str | None = None
            if kind == "f":
                content = path.read_bytes()
            elif kind == "l":
                content = os.readlink(path)
            out[rel] = Entry(
                kind, stat.S_IMODE(st.st_mode), st.st_nlink, st.st_size, st.st_ino, content
            )
    return out


def read_golden(step: Path) -> dict[str, Entry]:
    """A golden step: the manifest (metadata, inodes), bytes from tree/ (hard links are
    separate copies there)."""
    manifest = json.loads((step / "manifest.json").read_text())
    out: dict[str, Entry] = {}
    for e in manifest["entries"]:
        content: bytes | str | None = None
        if e["type"] == "f":
            content = (step / "tree" / e["path"]).read_bytes()
        elif e["type"] == "l":
            content = e["target"]
        out[e["path"]] = Entry(
            e["type"], int(e["mode"], 8), e["nlink"], e["size"], e["ino"], content
        )
    return out


@dataclass(frozen=True)
class ProcMap:
    """One upstream process and ours in its place."""

    golden_pid: int
    golden_key: str  # upstream's $dev-$ino of the object
    golden_base: int
    ours: Registrant
    key: str


def golden_process(scenario: str, role: str, obj: Path, ours: Registrant) -> ProcMap:
    info = json.loads((GOLDEN / scenario / "run1" / "info.json").read_text())
    proc = info["processes"][role]
    first = proc["object_maps"][0].split()
    start = int(first[0].split("-")[0], 16)
    major, minor = (int(x, 16) for x in first[3].split(":"))
    golden_key = f"{os.makedev(major, minor)}-{first[4]}"
    return ProcMap(
        proc["pid"], golden_key, 0 if read_elf(obj).et_exec else start, ours, file_key(obj)
    )


def map_path(path: str, procs: list[ProcMap]) -> str:
    parts = path.split("/")
    for pm in procs:
        gpid, pid = str(pm.golden_pid), str(pm.ours.pid)
        if len(parts) >= 3 and parts[:2] == ["stash", "dof-pid"] and parts[2] == gpid:
            parts[2] = pid
            if len(parts) >= 4 and parts[3] == pm.golden_key:
                parts[3] = pm.key
        if len(parts) >= 2 and parts[0] == "probes" and parts[1] == gpid:
            parts[1] = pid
            if len(parts) >= 3 and parts[2].endswith(gpid):
                parts[2] = parts[2][: -len(gpid)] + pid
        if len(parts) == 3 and parts[:2] == ["stash", "dof"]:
            if parts[2] == pm.golden_key:
                parts[2] = pm.key
            elif parts[2] == pm.golden_key + "-1":
                parts[2] = pm.key + "-1"
    return "/".join(parts)


def rebase_tracepoints(data: bytes, delta: int) -> bytes:
    """A parsed file with every TRACEPOINT address moved by ``delta``."""
    out = bytearray(data)
    pos = 8  # u64 version
    while pos < len(out):
        size, kind = struct.unpack_from("<QI", out, pos)
        assert size >= 16, f"bad record size {size} at {pos}"
        if kind == DIT_TRACEPOINT:
            (addr,) = struct.unpack_from("<Q", out, pos + 16)
            struct.pack_into("<Q", out, pos + 16, (addr + delta) % (1 << 64))
        pos += size
    assert pos == len(out), "records overrun the file"
    return bytes(out)


def proc_of(path: str, procs: list[ProcMap]) -> ProcMap | None:
    parts = path.split("/")
    for pm in procs:
        if parts[:3] == ["stash", "dof-pid", str(pm.golden_pid)] or parts[:2] == [
            "probes",
            str(pm.golden_pid),
        ]:
            return pm
    return None


def expected_content(path: str, golden: Entry, procs: list[ProcMap]) -> bytes | str | None:
    pm = proc_of(path, procs)
    name = path.rsplit("/", 1)[-1]
    if golden.kind == "l":
        assert pm is not None and golden.content == pm.golden_key, (path, golden.content)
        return pm.key
    if golden.kind != "f" or pm is None:
        return golden.content
    assert isinstance(golden.content, bytes)
    if name == "exec-mapping":
        assert re.fullmatch(rb"\d+-\d+", golden.content), golden.content
        return pm.ours.exe_key.encode()
    if name == "dh":
        mod = golden.content[: golden.content.index(b"\0")]
        assert struct.unpack_from("<Q", golden.content, 64)[0] == pm.golden_base
        return mod.ljust(64, b"\0") + struct.pack("<Q", pm.ours.base) + golden.content[72:]
    if ("/parsed/" in path and name != "version") or path.startswith("probes/"):
        return rebase_tracepoints(golden.content, pm.ours.base - pm.golden_base)
    return golden.content


def differences(
    ours: dict[str, Entry], golden: dict[str, Entry], procs: list[ProcMap]
) -> list[str]:
    """Every difference between our tree and the mapped golden tree, one line each."""
    diffs: list[str] = []
    mapped = {map_path(p, procs): (p, e) for p, e in golden.items()}
    for path in sorted(set(mapped) - set(ours)):
        diffs.append(f"missing in ours: {path}")
    for path in sorted(set(ours) - set(mapped)):
        diffs.append(f"extra in ours: {path}")
    for path in sorted(set(ours) & set(mapped)):
        gpath, g = mapped[path]
        o = ours[path]
        want = expected_content(gpath, g, procs) if g.kind != "d" else None
        # a mapped name or address string has the length of ours
        want_size = g.size if want is None else len(want)
        for attr, mine, theirs in (
            ("kind", o.kind, g.kind),
            ("mode", oct(o.mode), oct(g.mode)),
            ("nlink", o.nlink, g.nlink),
            ("size", o.size, want_size),
        ):
            if mine != theirs:
                diffs.append(f"{path}: {attr} {mine!r}, upstream {theirs!r}")
        if o.kind == g.kind and o.kind != "d" and o.content != want:
            diffs.append(f"{path}: content {o.content!r}, upstream (mapped) {want!r}")

    # hard links: the same sets of paths share an inode
    def groups(tree: dict[str, Entry], rename: dict[str, str]) -> set[frozenset[str]]:
        by_ino: dict[int, set[str]] = {}
        for p, e in tree.items():
            if e.kind != "d":
                by_ino.setdefault(e.ino, set()).add(rename.get(p, p))
        return {frozenset(s) for s in by_ino.values()}

    ours_groups = groups(ours, {})
    golden_groups = groups(golden, {gp: p for p, (gp, _) in mapped.items()})
    for g in sorted(golden_groups - ours_groups, key=sorted):
        diffs.append(f"upstream hard-links {sorted(g)}, ours do not")
    for g in sorted(ours_groups - golden_groups, key=sorted):
        diffs.append(f"ours hard-link {sorted(g)}, upstream does not")
    return diffs


def assert_like_golden(daemon: DaemonHandle, step: Path, procs: list[ProcMap]) -> None:
    ours = read_tree(daemon.state_dir)
    diffs = differences(ours, read_golden(step), procs)
    assert not diffs, f"{len(diffs)} differences from {step.relative_to(REPO)}:\n" + "\n".join(
        diffs
    )
    # dh: zeros after the module name's NUL (upstream: uninitialised stack there)
    for path, entry in ours.items():
        if path.endswith("/dh"):
            assert isinstance(entry.content, bytes)
            name_end = entry.content.index(b"\0")
            assert entry.content[name_end:64] == bytes(64 - name_end), path


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonHandle]:
    # tmpfs, as upstream's /run/dtrace in the goldens (directory sizes are tmpfs's)
    with tempfile.TemporaryDirectory(prefix="notes-register.", dir="/dev/shm") as tmp:
        handle = start_daemon(Path(tmp))
        try:
            yield handle
        except BaseException:
            handle.cleanup_hard()
            raise
        finish(handle)


def gone(daemon: DaemonHandle, pid: int) -> None:
    daemon.wait_for(
        f"pid {pid} pruned",
        lambda: pid not in daemon.stash_pids() + daemon.probe_pids(),
        timeout=60,  # a loaded machine; never a timing assertion
    )


@pytest.mark.parametrize(
    ("scenario", "obj"),
    [
        ("fx_exec", "fx_exec"),
        ("fx_isenabled", "fx_isenabled"),
        ("fx_kinds", "fx_kinds"),
        ("libfx", "libfx.so"),
    ],
)
def test_registered_then_exited_like_upstream(
    daemon: DaemonHandle, scenario: str, obj: str
) -> None:
    path = NOTES / obj
    steps = sorted((GOLDEN / scenario / "run1").glob("0*-*"))
    registered = next(s for s in steps if s.name.endswith(("-registered", "-dlopened")))
    exited = steps[-1]
    assert exited.name.endswith("-exited")
    ours = Registrant(path, daemon.device)
    try:
        assert (ours.gen, ours.errno) == (0, 0), daemon.log_text()
        role = "loader" if scenario == "libfx" else "main"
        assert_like_golden(daemon, registered, [golden_process(scenario, role, path, ours)])
    finally:
        ours.exit()
    # REMOVE cannot reach a FUSE helper: the exit is what removes it (upstream: drti's REMOVE)
    gone(daemon, ours.pid)
    assert_like_golden(daemon, exited, [])


def test_second_process_shares_the_raw_blocks(daemon: DaemonHandle) -> None:
    path = NOTES / "fx_exec"
    steps = sorted((GOLDEN / "twice" / "run1").glob("0*-*"))
    first = Registrant(path, daemon.device)
    second = Registrant(path, daemon.device)
    try:
        assert (first.gen, second.gen) == (0, 0), daemon.log_text()
        procs = [
            golden_process("twice", "first", path, first),
            golden_process("twice", "second", path, second),
        ]
        assert_like_golden(daemon, steps[0], procs)  # both-registered: raw nlink 3
        first.exit()
        gone(daemon, first.pid)
        assert_like_golden(daemon, steps[1], procs[1:])  # first-exited: nlink 2
    finally:
        if first.proc.poll() is None:
            first.exit()
        second.exit()
    gone(daemon, second.pid)
    assert_like_golden(daemon, steps[2], [])


def test_reparse_uses_only_the_stored_raw_blocks(daemon: DaemonHandle, tmp_path: Path) -> None:
    """SIGUSR2 rewrites the parsed files from raw/raw-1 alone: the object's bytes are
    zeroed (same inode, still mapped) before the reparse, and the files come out the same."""
    obj = tmp_path / "fx_kinds"
    shutil.copyfile(NOTES / "fx_kinds", obj)
    ours = Registrant(obj, daemon.device)
    try:
        assert ours.gen == 0, daemon.log_text()
        key = file_key(obj)
        mapping = daemon.state_dir / "stash" / "dof-pid" / str(ours.pid) / key
        before = read_tree(daemon.state_dir)
        parsed = {p: e for p, e in before.items() if f"{key}/parsed/" in p}
        assert len(parsed) == 10  # 9 probes + version
        with obj.open("r+b") as f:  # nothing of the object is left to read
            f.write(bytes(obj.stat().st_size))
        log_size = len(daemon.log_text())
        os.kill(daemon.pid, signal.SIGUSR2)
        daemon.wait_for(
            "the forced reparse",
            lambda: "reparse (forced):" in daemon.log_text()[log_size:],
            timeout=60,
        )
        summary = re.search(r"reparse \(forced\): .*", daemon.log_text()[log_size:])
        assert summary is not None
        assert summary.group() == "reparse (forced): 1 mappings reparsed, 0 failed"
        after = read_tree(daemon.state_dir)
        rewritten = {p: e for p, e in after.items() if f"{key}/parsed/" in p}
        assert {p: e.content for p, e in rewritten.items()} == {
            p: e.content for p, e in parsed.items()
        }
        # really rewritten (new files), and linked into probes/ again
        assert all(rewritten[p].ino != parsed[p].ino for p in parsed if not p.endswith("version"))
        assert {e.ino for p, e in after.items() if p.startswith(f"probes/{ours.pid}/")} >= {
            e.ino for p, e in rewritten.items() if not p.endswith("version")
        }
        assert mapping.is_dir()

        # everything else as it was: paths, kinds, modes, link counts, sizes, bytes
        def meta(tree: dict[str, Entry]) -> dict[str, tuple[object, ...]]:
            return {p: (e.kind, e.mode, e.nlink, e.size, e.content) for p, e in tree.items()}

        assert meta(after) == meta(before)
    finally:
        ours.exit()
    gone(daemon, ours.pid)
