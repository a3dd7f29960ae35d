"""A failed registration undoes exactly what it created, whichever step fails.

Each scenario builds a tree, then registers with the n-th write-type system
call failing for real (:mod:`tests.stash.faults`), for n = 1, 2, … until the
registration makes fewer calls than n (and so succeeds).  After every failure
the tree must be byte-identical to before — types, modes, sizes, link counts,
symlink targets, file bytes and extended attributes — the writer must report
the injected errno (not an EBADF from its undo), and verify must say what it
said before.

Stale entries (pid reuse, exec) are pruned in a separate, committed step
before the registration (docs/stash.md): for that scenario "before" is the
tree with that pid's old entries removed.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from common.records import ResultRecord
from common.stash_protocol import Registration
from dtprobed.oslib.dirfd import DirFd
from dtprobed.stash.store import Stash
from dtprobed.stash.verify import verify_tree
from tests.stash.faults import run_failing_at
from tests.stash.support import dof_bytes, records_for, registration, snapshot

P, Q, R = 4100001, 4100002, 4100003  # never run: registering checks no liveness
ERRNOS = (errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EMFILE)

TWO_FUNCS = records_for(
    "prv", [("mod", "f1", "a", 0x1000), ("mod", "f2", "b", 0x2000), ("mod", "f1", "c", 0x3000)]
)
OVERLAP = records_for("old", [("m", "f", "x", 0x10), ("m", "g", "new", 0x20)], args=True)


def reg(pid: int, **kw: object) -> Registration:
    return registration(pid, 1000 + pid % 10, token="t1", **kw)  # type: ignore[arg-type]


def _upstreamify(state: Path, pid: int) -> None:
    """As upstream's daemon leaves a pid directory: no xattrs, no exec-mapping (M quirk)."""
    pdir = state / f"stash/dof-pid/{pid}"
    for name in os.listxattr(pdir):
        os.removexattr(pdir, name)
    (pdir / "exec-mapping").unlink()


def _base(state: Path, upstream: bool) -> None:
    stash = Stash(str(state))
    stash.register(reg(P, ino=1), records_for("old", [("m", "f", "x", 0x10)]))
    stash.register(reg(Q, ino=5), records_for("q", [("m", "f", "y", 0x10)]))
    stash.close()
    if upstream:
        _upstreamify(state, P)


Scenario = Callable[[Path], tuple[Registration, list[ResultRecord]]]


def upstream_dir_new_raw(state: Path) -> tuple[Registration, list[ResultRecord]]:
    _base(state, upstream=True)
    return reg(P, ino=7), TWO_FUNCS


def upstream_dir_shared_raw_overlapping_probe(
    state: Path,
) -> tuple[Registration, list[ResultRecord]]:
    _base(state, upstream=True)
    return reg(P, ino=5), OVERLAP  # stash/dof/64768-5 is Q's, same bytes: linked


def upstream_dir_same_mapping_again(state: Path) -> tuple[Registration, list[ResultRecord]]:
    _base(state, upstream=True)
    return reg(P, ino=1), records_for("old", [("m", "f", "x", 0x10)])


def our_dir_private_raw(state: Path) -> tuple[Registration, list[ResultRecord]]:
    _base(state, upstream=False)
    return reg(P, ino=5, dof=dof_bytes("other")), TWO_FUNCS  # bytes differ from Q's


def new_pid_anonymous(state: Path) -> tuple[Registration, list[ResultRecord]]:
    _base(state, upstream=False)
    return reg(R, dev=0, ino=0x7F0000), TWO_FUNCS


def new_pid_shared_raw(state: Path) -> tuple[Registration, list[ResultRecord]]:
    _base(state, upstream=False)
    return reg(R, ino=5), OVERLAP


def pid_reused(state: Path) -> tuple[Registration, list[ResultRecord]]:
    _base(state, upstream=False)
    return registration(P, 999_999, token="t1", ino=5), TWO_FUNCS  # other start time


SCENARIOS = [
    upstream_dir_new_raw,
    upstream_dir_shared_raw_overlapping_probe,
    upstream_dir_same_mapping_again,
    our_dir_private_raw,
    new_pid_anonymous,
    new_pid_shared_raw,
    pid_reused,
]


def _verify(state: Path) -> list[str]:
    with DirFd(None, str(state), readable=True) as root:
        return verify_tree(root.fd)


def _register(stash: Stash, reg: Registration, records: list[ResultRecord]) -> int:
    return stash.register(reg, records)


def _remove_p(stash: Stash) -> None:
    stash.remove_pid(P)


def _prune_calls(tmp_path: Path) -> int:
    """How many write-type calls the committed prune of pid_reused's old process makes."""
    state = tmp_path / "count"
    pid_reused(state)
    out = run_failing_at(functools.partial(Stash, str(state)), _remove_p, 0, 0)
    assert out.kind == "ok", out
    return len(out.calls)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_every_failing_step_leaves_the_tree_as_it_was(tmp_path: Path, scenario: Scenario) -> None:
    prune_calls = _prune_calls(tmp_path) if scenario is pid_reused else 0
    n = 1
    while True:
        state = tmp_path / f"n{n}"
        registration_, records = scenario(state)
        expected = snapshot(str(state), with_xattrs=True)
        problems = _verify(state)  # an upstream-made directory may lack exec-mapping
        original = expected
        if scenario is pid_reused:  # the committed prune of the earlier process stays done
            pruned = tmp_path / f"pruned{n}"
            scenario(pruned)
            stash = Stash(str(pruned))
            stash.remove_pid(P)
            stash.close()
            expected = snapshot(str(pruned), with_xattrs=True)
            problems = _verify(pruned)
        err = ERRNOS[n % len(ERRNOS)]
        out = run_failing_at(
            functools.partial(Stash, str(state)),
            functools.partial(_register, reg=registration_, records=records),
            n,
            err,
        )
        if not out.injected:  # fewer than n calls: nothing failed
            assert out.kind == "ok", out
            assert _verify(state) == []
            assert n > 3, f"only {n - 1} write-type calls: the filter caught nothing? {out}"
            return
        where = f"step {n} ({out.failed}; calls {out.calls})"
        assert out.kind == "error", f"{where}: {out}"
        assert out.value == err, f"{where}: the writer reported {out.value}, not {err}: {out}"
        assert os.strerror(err) in out.message, f"{where}: {out.message}"
        if n <= prune_calls:
            # the prune itself failed: it un-commits first, so start-up recovery
            # finishes it (or nothing had changed yet)
            Stash(str(state)).close()
            assert snapshot(str(state), with_xattrs=True) in (expected, original), where
            assert _verify(state) == problems, where
            n += 1
            continue
        assert snapshot(str(state), with_xattrs=True) == expected, where
        assert _verify(state) == problems, where
        n += 1
