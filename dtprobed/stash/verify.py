"""``verify``: every invariant of the stash layout, checked read-only.

Importable without the writer: ``dtprobed-stash verify`` runs it as any user,
and the writer runs it on request.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from common.dof_abi import DOF_MAG_STRING, DOF_MAXSZ
from common.errors import StashFormatError
from common.names import printable
from common.stash_format import DOF_PARSED_VERSION, VERSION, VERSION_BYTES, decode_probe_file
from dtprobed.oslib.dirfd import DirFd
from dtprobed.stash.layout import (
    HELPER_SIZE,
    MAX_EXEC_MAPPING,
    RAW_PREFIX,
    is_number,
    parse_exec_mapping,
    raw_name,
    read_small,
    shared_raw_name,
    split_key,
    split_shared_raw_name,
    split_spec,
)


def _no_tick() -> None:
    pass


def verify_tree(root_fd: int, tick: Callable[[], None] = _no_tick) -> list[str]:
    """Every invariant of the layout; returns the problems found (empty = consistent).

    Read-only and lock-free.  An entry that vanishes between being listed and
    being looked at (the writer removed it meanwhile) is skipped, never an
    error; the writer runs this on a tree it alone changes, so for it the
    result is exact.
    """
    return _Verifier(root_fd, tick).run()


def verify_settled(root_fd: int, passes: int = 3) -> list[str]:
    """:func:`verify_tree` for a reader while the writer may be working: lock-free.

    A registration or removal in progress shows as a transient problem (a
    mapping not yet committed, a generation already removed); a real
    inconsistency stays.  Reports only the problems found by every one of up
    to *passes* passes (it stops at the first clean one).
    """
    problems = verify_tree(root_fd)
    for _ in range(passes - 1):
        if not problems:
            break
        again = set(verify_tree(root_fd))
        problems = [p for p in problems if p in again]
    return problems


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    """lstat, or None if *name* vanished since it was listed."""
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


class _Verifier:
    def __init__(self, root_fd: int, tick: Callable[[], None] = _no_tick) -> None:
        """*tick* is called once per file looked at (the writer's progress)."""
        self.root = root_fd
        self.tick = tick
        self.problems: list[str] = []
        self.raw_links: dict[str, list[int]] = {}  # key → inodes of mapping raw files
        self.parsed: dict[int, dict[str, set[int]]] = {}  # pid → spec → parsed inodes
        self.bound: set[int] = set()  # parsed inodes reachable from probes/

    def bad(self, text: str) -> None:
        self.problems.append(text)

    def run(self) -> list[str]:
        try:
            stash = DirFd(self.root, "stash", readable=True)
            dof = DirFd(stash.fd, "dof", readable=True)
            dofpid = DirFd(stash.fd, "dof-pid", readable=True)
            probes = DirFd(self.root, "probes", readable=True)
        except OSError as err:
            return [f"state directory incomplete: {err}"]
        with stash, dof, dofpid, probes:
            for item in sorted(os.listdir(self.root)):
                if item not in ("stash", "probes"):
                    self.bad(f"unexpected entry {printable(item)} in the state directory")
            for item in sorted(os.listdir(stash.fd)):
                if item not in ("dof", "dof-pid"):
                    self.bad(f"unexpected entry stash/{printable(item)}")
            pids = []
            for name in sorted(os.listdir(dofpid.fd)):
                st = _lstat(name, dofpid.fd)
                if st is None:
                    continue
                if not is_number(name) or not stat.S_ISDIR(st.st_mode):
                    self.bad(f"unexpected entry stash/dof-pid/{printable(name)}")
                    continue
                pids.append(int(name))
            for pid in sorted(pids):
                try:
                    pdir = DirFd(dofpid.fd, str(pid), readable=True)
                except FileNotFoundError:
                    continue  # removed meanwhile
                with pdir:
                    self.check_pid(pid, pdir.fd)
            self.check_shared_raw(dof.fd)
            self.check_probes(probes.fd, pids)
        return self.problems

    def check_pid(self, pid: int, pid_fd: int) -> None:
        where = f"stash/dof-pid/{pid}"
        gens: dict[int, str] = {}
        keys: list[str] = []
        for name in sorted(os.listdir(pid_fd)):
            st = _lstat(name, pid_fd)
            if st is None:
                continue
            if name in ("next-gen", "exec-mapping"):
                if not stat.S_ISREG(st.st_mode):
                    self.bad(f"{where}/{name} is not a regular file")
                else:
                    self.single_link(st, f"{where}/{name}")
            elif is_number(name) and stat.S_ISLNK(st.st_mode):
                try:
                    gens[int(name)] = os.readlink(name, dir_fd=pid_fd)
                except FileNotFoundError:
                    continue
            elif split_key(name) is not None and stat.S_ISDIR(st.st_mode):
                keys.append(name)
            else:
                self.bad(f"unexpected entry {where}/{printable(name)}")
        if not gens:
            self.bad(f"{where} has no generations")
        for gen, target in sorted(gens.items()):
            if target not in keys:
                self.bad(f"{where}/{gen} -> {printable(target)}: target is not a mapping directory")
        for key in keys:
            if key not in gens.values():
                self.bad(f"{where}/{key} is referenced by no generation (orphan)")
        try:
            size = os.lstat("next-gen", dir_fd=pid_fd).st_size
            if gens and size < max(gens) + 1:
                self.bad(f"{where}/next-gen is {size}, highest generation is {max(gens)}")
        except FileNotFoundError:
            self.bad(f"{where}/next-gen is missing")
        try:
            em = read_small(pid_fd, "exec-mapping", MAX_EXEC_MAPPING)
            if parse_exec_mapping(em) is None:
                self.bad(f'{where}/exec-mapping is {em!r}, not "$dev-$ino" (optional NUL)')
        except OSError as err:
            self.bad(f"{where}/exec-mapping: {err.strerror}")
        self.parsed[pid] = {}
        for key in keys:
            try:
                mdir = DirFd(pid_fd, key, readable=True)
            except FileNotFoundError:
                continue
            with mdir:
                self.check_mapping(pid, key, mdir.fd, f"{where}/{key}")

    def single_link(self, st: os.stat_result, path: str) -> None:
        """next-gen, exec-mapping, dh, parsed/version are private: link count 1."""
        if st.st_nlink != 1:
            self.bad(f"{path}: link count {st.st_nlink}, expected 1 (a planted hard link?)")

    def check_mapping(self, pid: int, key: str, map_fd: int, where: str) -> None:
        names = set(os.listdir(map_fd))
        notes = raw_name(1) in names
        for extra in sorted(names - {"raw", raw_name(1), "dh", "parsed"}):
            self.bad(f"unexpected entry {where}/{printable(extra)}")
        for index in range(2 if notes else 1):
            own = raw_name(index)
            try:
                st = os.lstat(own, dir_fd=map_fd)
                if not stat.S_ISREG(st.st_mode):
                    self.bad(f"{where}/{own} is not a regular file")
                    continue
                if st.st_nlink > 1:
                    self.raw_links.setdefault(shared_raw_name(key, index), []).append(st.st_ino)
                raw = read_small(map_fd, own, len(RAW_PREFIX) + DOF_MAXSZ)
            except OSError as err:
                self.bad(f"{where}/{own}: {err.strerror}")
                continue
            if len(raw) <= len(RAW_PREFIX) and not (index == 0 and raw[:4] == DOF_MAG_STRING):
                self.bad(f"{where}/{own} is {len(raw)} bytes: no data after its u64 base")
            elif (
                not notes
                and raw[:4] != DOF_MAG_STRING
                and (raw[:8] != RAW_PREFIX or raw[8:12] != DOF_MAG_STRING)
            ):
                self.bad(f"{where}/raw is neither u64 base 0 + DOF nor legacy DOF")
        try:
            dh = read_small(map_fd, "dh", HELPER_SIZE + 1)
            if len(dh) != HELPER_SIZE:
                self.bad(f"{where}/dh is {len(dh)} bytes, not {HELPER_SIZE}")
            self.single_link(os.lstat("dh", dir_fd=map_fd), f"{where}/dh")
        except OSError as err:
            self.bad(f"{where}/dh: {err.strerror}")
        try:
            parsed = DirFd(map_fd, "parsed", readable=True)
        except OSError as err:
            self.bad(f"{where}/parsed: {err.strerror}")
            return
        with parsed:
            entries = sorted(os.listdir(parsed.fd))
            has_version = "version" in entries
            if has_version:
                try:
                    v = read_small(parsed.fd, "version", 8)
                    self.single_link(
                        os.lstat("version", dir_fd=parsed.fd), f"{where}/parsed/version"
                    )
                    if v != VERSION_BYTES:
                        found = VERSION.unpack(v)[0] if len(v) == 8 else v
                        self.bad(
                            f"{where}/parsed/version is {found!r}, not {DOF_PARSED_VERSION} (needs reparse)"
                        )
                except OSError as err:
                    self.bad(f"{where}/parsed/version: {err.strerror}")
            for name in entries:
                if name == "version":
                    continue
                self.check_parsed_file(pid, parsed.fd, name, f"{where}/parsed", has_version)

    def check_parsed_file(
        self, pid: int, parsed_fd: int, name: str, where: str, has_version: bool
    ) -> None:
        self.tick()
        parts = split_spec(name)
        path = f"{where}/{printable(name)}"
        if parts is None:
            self.bad(f"{path}: not a valid prv:mod:fun:prb name")
            return
        if not has_version:
            self.bad(f"{path}: parsed file in a mapping without parsed/version")
        try:
            st = os.lstat(name, dir_fd=parsed_fd)
            data = read_small(parsed_fd, name, 1 << 26)
        except OSError as err:
            self.bad(f"{path}: {err.strerror}")
            return
        try:
            pf = decode_probe_file(data)
        except StashFormatError as err:
            self.bad(f"{path}: format invalid: {err}")
        else:
            inside = (pf.provider.name, pf.probe.mod, pf.probe.fun, pf.probe.prb)
            if inside != parts:
                self.bad(f"{path}: holds probe {':'.join(inside)}")
        self.parsed[pid].setdefault(name, set()).add(st.st_ino)
        if st.st_nlink not in (1, 2):
            self.bad(f"{path}: link count {st.st_nlink}, expected 1 or 2")

    def check_shared_raw(self, dof_fd: int) -> None:
        seen = set()
        for name in sorted(os.listdir(dof_fd)):
            st = _lstat(name, dof_fd)
            if st is None:
                continue
            block = split_shared_raw_name(name)
            if block is None or not stat.S_ISREG(st.st_mode):
                self.bad(f"unexpected entry stash/dof/{printable(name)}")
                continue
            seen.add(name)
            ids = split_key(block[0])
            assert ids is not None
            if ids[0] == 0:
                self.bad(f"stash/dof/{name}: anonymous DOF must not be shared")
            links = self.raw_links.get(name, [])
            users = sum(1 for ino in links if ino == st.st_ino)
            if users == 0:
                self.bad(f"stash/dof/{name} is used by no registration (orphan)")
            if st.st_nlink != users + 1:
                self.bad(
                    f"stash/dof/{name}: link count {st.st_nlink}, {users} registrations link it"
                )
            if any(ino != st.st_ino for ino in links):
                self.bad(f"a raw file of mapping {name} with links is not stash/dof/{name}")
        for key in sorted(set(self.raw_links) - seen):
            self.bad(f"raw files of mapping {key} have links but stash/dof/{key} is missing")

    def check_probes(self, probes_fd: int, pids: list[int]) -> None:
        for name in sorted(os.listdir(probes_fd)):
            st = _lstat(name, probes_fd)
            if st is None:
                continue
            if not is_number(name) or not stat.S_ISDIR(st.st_mode):
                self.bad(f"unexpected entry probes/{printable(name)}")
                continue
            pid = int(name)
            if pid not in pids:
                self.bad(f"probes/{pid} belongs to no registered process (orphan)")
                continue
            try:
                d = DirFd(probes_fd, name, readable=True)
            except FileNotFoundError:
                continue
            with d:
                self.walk_probes(pid, d.fd, f"probes/{pid}", [])
        for pid, specs in self.parsed.items():
            for spec, inodes in sorted(specs.items()):
                if not inodes & self.bound:
                    prv, mod, fun, prb = spec.split(":")
                    self.bad(
                        f"probes/{pid}/{prv}{pid}/{mod}/{fun}/{prb} is missing for parsed/{spec}"
                    )

    def walk_probes(self, pid: int, dir_fd: int, where: str, path: list[str]) -> None:
        names = sorted(os.listdir(dir_fd))
        if not names:
            self.bad(f"{where} is an empty directory (orphan)")
        for name in names:
            self.tick()
            st = _lstat(name, dir_fd)
            if st is None:
                continue
            here = f"{where}/{printable(name)}"
            if len(path) < 3:
                if not stat.S_ISDIR(st.st_mode):
                    self.bad(f"{here} is not a directory")
                    continue
                if not path and not (name.endswith(str(pid)) and len(name) > len(str(pid))):
                    self.bad(f"{here}: provider directory does not end in the pid")
                try:
                    d = DirFd(dir_fd, name, readable=True)
                except FileNotFoundError:
                    continue
                with d:
                    self.walk_probes(pid, d.fd, here, [*path, name])
                continue
            prv = path[0][: -len(str(pid))]
            spec = f"{prv}:{path[1]}:{path[2]}:{name}"
            if not stat.S_ISREG(st.st_mode):
                self.bad(f"{here} is not a regular file")
            elif st.st_ino not in self.parsed.get(pid, {}).get(spec, set()):
                self.bad(f"{here} is not a link to a parsed/{printable(spec)} of PID {pid}")
            else:
                self.bound.add(st.st_ino)
