"""Read-only views of a stash tree for assertions: snapshots and decoded probe files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from common.stash_format import ProbeFile, decode_probe_file


def snapshot(state_dir: Path) -> dict[str, tuple[str, bytes | str | None, int]]:
    """Every path under *state_dir*: (kind, content or link target, mode) — for byte-identity."""
    out: dict[str, tuple[str, bytes | str | None, int]] = {}
    for root, dirs, files in os.walk(state_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, state_dir)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path), st.st_mode)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", None, st.st_mode)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read(), st.st_mode)
    return out


def generations(state_dir: Path, pid: int) -> dict[int, str]:
    """``dof-pid/$pid/$gen`` symlinks: generation → ``$dev-$ino`` target."""
    d = state_dir / "stash" / "dof-pid" / str(pid)
    if not d.exists():
        return {}
    return {int(p.name): os.readlink(p) for p in d.iterdir() if p.name.isdigit() and p.is_symlink()}


def probe_files(state_dir: Path, pid: int) -> dict[str, ProbeFile]:
    """``probes/$pid/$prv$pid/$mod/$fun/$prb`` → decoded, keyed ``prv:mod:fun:prb`` (no pid)."""
    base = state_dir / "probes" / str(pid)
    out: dict[str, ProbeFile] = {}
    if not base.exists():
        return out
    for prv in base.iterdir():
        for mod in prv.iterdir():
            for fun in mod.iterdir():
                for prb in fun.iterdir():
                    provider = prv.name[: -len(str(pid))]
                    out[f"{provider}:{mod.name}:{fun.name}:{prb.name}"] = decode_probe_file(
                        prb.read_bytes()
                    )
    return out


def glibc_dev(st_dev: int) -> int:
    """A file's st_dev re-encoded the way the stash names it (glibc makedev)."""
    major, minor = os.major(st_dev), os.minor(st_dev)
    return (
        ((major & 0xFFF) << 8) | (minor & 0xFF) | ((minor & ~0xFF) << 12) | ((major & ~0xFFF) << 32)
    )


def file_key(path: Path) -> str:
    """The ``$dev-$ino`` key a file-backed DOF mapping of *path* gets."""
    st = os.stat(path)
    return f"{glibc_dev(st.st_dev)}-{st.st_ino}"
