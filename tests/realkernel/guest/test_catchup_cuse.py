"""Catch-up and REMOVE on a real CUSE kernel (guest only: the VM's Debian 6.1 kernel).

In CUSE mode, unlike FUSE mode, the REMOVE a constructor-less process sends reaches the
daemon. A ``.SUNW_dof`` program (with a ``.SUNW_dof`` library dlopened) starts before the
daemon: its constructors' ``open()`` of the helper fails, so each holds generation 0.
The daemon starts and catches it up at generations 1 and 2. Then:

* ``dlclose``: the library's destructor now opens the helper and sends REMOVE(0), by
  value, through the real kernel; the daemon answers 0 and removes nothing while the
  library is still mapped (the destructor runs before the unmapping) — above all not the
  executable's generation; the library goes at the next prune, once unmapped;
* exit: the executable's REMOVE(0) removes nothing either, and the exit prunes it all.

The host half (fake CUSE kernel, each REMOVE at a chosen moment) is
tests/integration/test_catchup.py.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_container import maps_base, maps_key
from tests.integration.test_sunw_dof import LIB, MAIN, expected_probes
from tests.support import sunw_dof as sd
from tests.support.daemon import DaemonHandle, finish, start_daemon
from tests.support.stash_view import generations, probe_files

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def shm() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="catchup-cuse.", dir="/dev/shm") as tmp:
        yield Path(tmp)


def summaries(daemon: DaemonHandle) -> list[str]:
    return [ln for ln in daemon.log_text().splitlines() if "catch-up: " in ln and "scanned" in ln]


def test_remove_zero_from_a_caught_up_process_on_real_cuse(shm: Path) -> None:
    pie = sd.build_sunw_object(MAIN, kind="pie", name="sunwpie")
    lib = sd.build_sunw_object(LIB, kind="lib", name="libsunwlib.so")
    Path("/dev/dtrace").mkdir(exist_ok=True)
    device = Path(f"/dev/dtrace/catchup-{os.getpid()}")
    prog = sd.SunwProgram.start(pie.path, devname=device)
    try:
        assert prog.command(f"o {lib.path}") == f"o {lib.path}"
        assert prog.info("li")["gen"] == "0"  # no helper yet: open() failed
        daemon = start_daemon(
            shm,
            device=device,
            extra_args=["--device-mode", "cuse", "-t", "60", "--prune-interval", "2"],
        )
        try:
            daemon.wait_for("the catch-up", lambda: len(summaries(daemon)) >= 1, timeout=300)
            pid = prog.pid
            # keys from maps (the VM's root is an overlay: stat's device is another)
            main_key, lib_key = maps_key(pid, pie.name), maps_key(pid, lib.name)
            assert generations(daemon.state_dir, pid) == {1: main_key, 2: lib_key}
            for obj, key in ((pie, main_key), (lib, lib_key)):
                mapping = daemon.state_dir / "stash" / "dof-pid" / str(pid) / key
                assert (mapping / "dh").read_bytes() == obj.helper(maps_base(pid, obj.name))
                assert (mapping / "raw").read_bytes()[8:] == obj.dof
            assert set(probe_files(daemon.state_dir, pid)) == expected_probes(
                pie
            ) | expected_probes(lib)
            assert prog.command("c") == "c"
            daemon.wait_for(
                "the REMOVE(0)",
                lambda: f"{pid}: REMOVE(0) from a caught-up process" in daemon.log_text(),
                timeout=120,
            )
            assert f"{pid}: removed generation 0" not in daemon.log_text()
            daemon.wait_for(
                "the next prune", lambda: generations(daemon.state_dir, pid) == {1: main_key}, 300
            )
            daemon.verify()
            status, err = prog.quit()
            assert status == 0, err
            assert "ioctl removed DOF (gen 0)" in err  # both REMOVEs got through, answered 0
            daemon.wait_for("exit pruning", lambda: pid not in daemon.stash_pids(), 300)
            daemon.verify()
        except BaseException:
            daemon.cleanup_hard()
            raise
        finish(daemon)
    finally:
        prog.kill()
