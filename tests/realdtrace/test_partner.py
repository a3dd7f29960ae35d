"""The real dtrace 2.0.7 chroot works as a test partner (tests/realdtrace/partner.py).

No skips: on this machine kind the chroot builds and the kernel has what dtrace needs; if
not, PartnerError says why in one line and the test fails.
"""

from __future__ import annotations

import re
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realdtrace import partner

HASUSDT = 0x4008D804
REMOVE = 0x4004D802


@pytest.fixture(scope="module")
def root() -> Path:
    return partner.ensure_chroot()


@pytest.fixture(scope="module")
def progs(root: Path) -> partner.Programs:
    return partner.build_programs(root)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # tmpfs, like the daemon's state directory in the interop tests.
    with tempfile.TemporaryDirectory(prefix="rdt-state.", dir="/dev/shm") as d:
        yield Path(d)


def section_names(path: Path) -> dict[str, tuple[int, int, int]]:
    """ELF64 little-endian section name -> (sh_type, sh_flags, sh_size), stdlib only."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = headers[shstrndx][4]
    names = {}
    for name_off, sh_type, sh_flags, _addr, _off, size, *_ in headers:
        end = data.index(b"\0", strtab_off + name_off)
        names[data[strtab_off + name_off : end].decode()] = (sh_type, sh_flags, size)
    return names


def test_dtrace_version_is_207(root: Path) -> None:
    assert partner.dtrace_version(root) == "dtrace: D 2.0.7"


@pytest.mark.slow
def test_programs_carry_usdt_notes(progs: partner.Programs) -> None:
    for obj in (progs.usdtprog, progs.libusdtlib):
        note = section_names(obj).get(".note.usdt")
        assert note is not None, f"{obj.name} has no .note.usdt"
        sh_type, sh_flags, size = note
        assert sh_type == 7  # SHT_NOTE
        assert sh_flags & 0x2 == 0  # not SHF_ALLOC: never mapped, read from the file
        assert size > 0


@pytest.mark.slow
def test_program_runs_and_obeys_commands(root: Path, progs: partner.Programs) -> None:
    with partner.mounted(root=root):
        prog = partner.Program.start(
            progs.usdtprog, devname="/nonexistent/helper", env={"DTRACE_DOF_INIT_DEBUG": "1"}
        )
        try:
            assert prog.command("s") == "s"
            assert prog.command("f 3") == "f 3"
            assert prog.command("e") == "e 0"  # nobody enabled the probe
            assert prog.command("o").startswith("o /var/cache/dtprobed-py/progs/")
            assert prog.command("l 2") == "l 2"
            assert prog.command("c") == "c"
            child = int(prog.command("k").split()[1])
            assert prog.read_line() == f"{child} ready"
            assert prog.command("> f 1") == ">"
            assert prog.expect(f"{child} ") == f"{child} ok f 1"
            assert prog.command("w") == "w 0"
        finally:
            status, err = prog.quit()
    assert status == 0
    # With DTRACE_DOF_INIT_DEBUG, drti says why it did not register (parent, library, child).
    assert err.count("DRTI: Failed to open helper device /nonexistent/helper") >= 3


def link_time_symbols(root: Path, progs: partner.Programs, obj: Path) -> dict[str, int]:
    nm = partner.run_in_chroot(["nm", progs.in_chroot(obj)], root=root)
    assert nm.returncode == 0, nm.stderr
    fields = (ln.split() for ln in nm.stdout.splitlines() if ln[:1] not in ("", " "))
    return {f[2]: int(f[0], 16) for f in fields if len(f) == 3}


@pytest.mark.slow
def test_drti_sends_hasusdt_with_an_address_in_the_object(
    root: Path, progs: partner.Programs
) -> None:
    """drti 2.0.7: HASUSDT (0x4008D804) with, by value, &dtrace_dof_init in the object;
    the failed registration leaves gen -1, which the destructor sends with REMOVE."""
    symbols = link_time_symbols(root, progs, progs.usdtprog)
    with partner.mounted(root=root):
        proc = subprocess.run(
            [
                "chroot",
                str(root),
                *("strace", "-e", "trace=ioctl", "-e", "raw=ioctl"),
                "env",
                "DTRACE_DOF_INIT_DEVNAME=/dev/null",  # opens, but the ioctl fails (ENOTTY)
                progs.in_chroot(progs.usdtprog),
            ],
            input="m\nq\n",
            capture_output=True,
            text=True,
            timeout=60,
            env=partner.CLEAN_ENV,
        )
    assert proc.returncode == 0, proc.stderr
    ioctls = re.findall(r"ioctl\((?:0x)?[0-9a-f]+, (0x[0-9a-f]+), (0x[0-9a-f]+)\)", proc.stderr)
    assert [int(req, 16) for req, _ in ioctls] == [HASUSDT, REMOVE]
    assert int(ioctls[1][1], 16) == 0xFFFFFFFF  # the generation of the failed HASUSDT
    # PIE: the argument is the load base + dtrace_dof_init's link-time address; main (in
    # the same object, printed by the "m" command) gives the same, page-aligned base.
    base = int(ioctls[0][1], 16) - symbols["dtrace_dof_init"]
    found = re.search(r"ok m (0x[0-9a-f]+)", proc.stdout)
    assert found is not None, proc.stdout
    assert int(found.group(1), 16) - symbols["main"] == base
    assert base > 0 and base % 4096 == 0
    # drti reports the failed ioctls even without DTRACE_DOF_INIT_DEBUG.
    assert "DRTI: Ioctl failed\n" in proc.stderr
    assert "DRTI: Ioctl failed to remove DOF (gen -1)" in proc.stderr


@pytest.mark.slow
def test_list_on_an_empty_state_dir(root: Path, state_dir: Path) -> None:
    """No match: dtrace 2.0.7 prints only the header, says "No probe matches description"
    on stderr, and still exits 0."""
    with partner.mounted(binds=[state_dir], root=root):
        res = partner.dtrace_list(state_dir, "nosuchprov*", root=root)
        builtin = partner.dtrace_list(state_dir, "dtrace", root=root)
    assert res.returncode == 0
    assert res.rows == []
    assert "No probe matches description" in res.stderr
    assert {(r.provider, r.module, r.function, r.name) for r in builtin.rows} == {
        ("dtrace", "", "", "BEGIN"),
        ("dtrace", "", "", "END"),
        ("dtrace", "", "", "ERROR"),
    }


def test_parse_list_columns() -> None:
    out = (
        "   ID   PROVIDER            MODULE                          FUNCTION NAME\n"
        "    1     dtrace                                                     BEGIN\n"
        " 4001 rdtmain123          usdtprog                          main tick\n"
    )
    assert partner.parse_list(out) == [
        partner.ProbeRow(1, "dtrace", "", "", "BEGIN"),
        partner.ProbeRow(4001, "rdtmain123", "usdtprog", "main", "tick"),
    ]
