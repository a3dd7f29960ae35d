"""Boot one CUSE-capable VM and run the in-guest suite there (marker ``realkernel``).

The guest session runs every shared scenario in CUSE mode against a private daemon
(tests/realkernel/guest/), the real dtrace 2.0.7 against that daemon in CUSE mode
(guest/test_realdtrace.py: the sid chroot and its programs are built here, on the host,
before the boot; the guest sees them on the shared root) and the parser sandbox tests (tests/sandbox/: under
emulation ``clock_gettime`` may be a real syscall, which the filter must allow).
The VM comes from tools/cuse-vm/ (first use: apt-get installs qemu, downloads the
kernel package).  Skip it on a fast host run with ``-m "not realkernel"``.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.realdtrace import partner
from tests.realkernel.harness import REPO, build_c_client

VM_TOOL = REPO / "tools" / "cuse-vm" / "cuse-vm.sh"
GUEST_TESTS = ["tests/realkernel/guest", "tests/sandbox"]
VM_TIMEOUT_S = 900


def guest_command(tmp: Path, client: Path) -> list[str]:
    shares = ["--share", str(tmp)]
    if sys.prefix.startswith("/tmp/"):  # the guest's /tmp is a fresh tmpfs
        shares += ["--share", sys.prefix]
    return [
        str(VM_TOOL),
        "--timeout",
        str(VM_TIMEOUT_S),
        *shares,
        "--",
        "env",
        "DTPROBED_IN_VM=1",
        f"DTPROBED_TEST_CLIENT={client}",
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-ra",
        f"--junitxml={tmp / 'guest.xml'}",
        *[path for path in GUEST_TESTS if (REPO / path).is_dir()],
    ]


@pytest.mark.realkernel
@pytest.mark.timeout(VM_TIMEOUT_S + 120)
def test_cuse_scenarios_in_vm(tmp_path: Path) -> None:
    client = build_c_client(tmp_path)
    # The guest's root is the host's, read-only with a write overlay, and host files changed
    # while it runs may go unseen: build the chroot and the programs first.
    partner.build_programs(partner.ensure_chroot())
    result = subprocess.run(
        guest_command(tmp_path, client),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    output = result.stdout
    print(output)  # the guest's pytest report, shown with -rP or on failure
    assert result.returncode == 0, f"guest session failed ({result.returncode}):\n{output}"
    report = ET.parse(tmp_path / "guest.xml").getroot()
    suite = report if report.tag == "testsuite" else report[0]
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    cuse_cases = [
        case.get("name", "")
        for case in suite.iter("testcase")
        if "guest" in case.get("classname", "")
    ]
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, output
    # the guest really ran the CUSE scenarios (not an empty collection)
    assert any(name.startswith("test_cuse[") for name in cuse_cases), output
    assert "test_auto_mode_picks_cuse" in cuse_cases, output
    # and the real dtrace ran against the CUSE daemon
    realdtrace = {
        case.get("name", "")
        for case in suite.iter("testcase")
        if case.get("classname", "").endswith("test_realdtrace")
    }
    assert realdtrace == {
        "test_cuse_hasusdt_list_fire_isenabled_dlclose",
        "test_cuse_fork_child_registers_fires_and_removes",
        "test_cuse_adddof_client_listed_and_fired",
    }, output
    # and programs in containers against a CUSE daemon (guest/test_container_cuse.py)
    containers = {
        case.get("name", "")
        for case in suite.iter("testcase")
        if case.get("classname", "").endswith("test_container_cuse")
    }
    assert containers == {
        "test_container_program_registers_and_removes_over_cuse[pid+mount]",
        "test_container_started_before_the_cuse_daemon_is_caught_up[pid+mount]",
        "test_notes_program_in_a_container_over_cuse",
        "test_unmapped_without_remove_goes_at_the_prune_over_cuse",
    }, output
