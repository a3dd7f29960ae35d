"""install.sh / uninstall.sh into a temporary root: every file where docs/operations.md says.

The documented list is the table between the ``installed-files`` markers of
docs/operations.md; the scripts' list is ``dtprobed_installed_files`` of
packaging/paths.sh.  Both must agree with what install.sh actually writes.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.packaging.conftest import (
    REPO,
    UNINSTALL,
    StagedInstall,
    in_staged_namespace,
    run_install,
)

OPERATIONS = REPO / "docs" / "operations.md"


def documented_files(prefix: str) -> set[str]:
    """Paths in the installed-files table of docs/operations.md, ``PREFIX`` substituted."""
    text = OPERATIONS.read_text()
    match = re.search(
        r"<!-- installed-files:begin -->(.*?)<!-- installed-files:end -->", text, re.S
    )
    assert match, "docs/operations.md lacks the installed-files table"
    paths = set()
    for row in match.group(1).splitlines():
        cells = row.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`"):
            continue
        paths.add(cells[1].strip().strip("`").replace("PREFIX", prefix).rstrip("/"))
    assert paths, "the installed-files table is empty"
    return paths


def script_files(prefix: str) -> set[str]:
    out = subprocess.run(
        [
            "bash",
            "-c",
            f'. "{REPO}/packaging/paths.sh"; dtprobed_paths "$1"; dtprobed_installed_files',
            "bash",
            prefix,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line for line in out.splitlines() if line}


def staged_files(root: Path) -> set[str]:
    """Every file under *root*, as target paths; the venv counted as one entry."""
    found = set()
    for path in root.rglob("*"):
        target = "/" + str(path.relative_to(root))
        if path.is_dir() and not path.is_symlink():
            continue
        venv = re.match(r"(.*/lib/dtprobed)/", target)
        found.add(venv.group(1) if venv else target)
    return found


def test_installs_exactly_the_documented_files(staged: StagedInstall) -> None:
    documented = documented_files(staged.prefix)
    assert script_files(staged.prefix) == documented
    doc_dir = f"{staged.prefix}/share/doc/dtprobed-py"
    installed = {p for p in staged_files(staged.root) if not p.startswith(doc_dir + "/")}
    assert installed == documented - {doc_dir}
    assert staged.path(f"{doc_dir}/README.md").is_file()
    assert staged.path(f"{doc_dir}/operations.md").is_file()
    assert staged.path(f"{doc_dir}/security.md").is_file()


def test_exec_start_names_the_installed_daemon(staged: StagedInstall) -> None:
    unit = staged.path("/usr/local/lib/systemd/system/dtprobed.service").read_text()
    exec_start = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == ["ExecStart=/usr/local/sbin/dtprobed -F"]
    # Nothing left to substitute by hand, and no trace of the staging root.
    for installed in staged.root.rglob("*"):
        # (the venv is pip's; the documents talk about @SBINDIR@ on purpose)
        skip = ("/lib/dtprobed/", "/share/doc/")
        if installed.is_file() and not any(part in str(installed) for part in skip):
            text = installed.read_text(errors="replace")
            assert not re.search(r"@[A-Z]+@", text), installed
            assert str(staged.root) not in text, installed
    daemon = staged.path("/usr/local/sbin/dtprobed").read_text().splitlines()
    assert daemon[0] == "#!/usr/local/lib/dtprobed/bin/python3 -I"
    assert "from dtprobed.daemon.main import main" in daemon


def test_entry_points_run_where_installed(staged: StagedInstall) -> None:
    result = in_staged_namespace(
        staged,
        "/usr/local/sbin/dtprobed --version && /usr/local/bin/dtprobed-parse --help"
        " && /usr/local/bin/dtprobed-stash --help && man -w dtprobed dtprobed-parse dtprobed-stash",
    )
    assert result.returncode == 0, result.stderr
    assert "dtprobed 0.1.0" in result.stdout
    assert "usage: dtprobed-parse" in result.stdout
    assert "usage: dtprobed-stash" in result.stdout
    assert "/usr/local/share/man/man8/dtprobed.8" in result.stdout


@pytest.mark.timeout(600)
def test_reinstall_is_idempotent_and_uninstall_removes_it_all(tmp_path: Path) -> None:
    """With --prefix /usr (a distribution layout): install twice, uninstall twice."""
    for _ in range(2):
        result = run_install(tmp_path, "--prefix", "/usr")
        assert result.returncode == 0, result.stdout + result.stderr
    unit = (tmp_path / "usr/lib/systemd/system/dtprobed.service").read_text()
    assert "ExecStart=/usr/sbin/dtprobed -F" in unit.splitlines()
    assert (tmp_path / "usr/lib/udev/rules.d/60-dtprobed.rules").is_file()
    assert (tmp_path / "usr/lib/systemd/system-preset/50-dtprobed.preset").is_file()
    assert staged_files(tmp_path) | {"/usr/share/doc/dtprobed-py"} >= script_files("/usr")
    for _ in range(2):
        result = subprocess.run(
            ["bash", str(UNINSTALL), "--root", str(tmp_path), "--prefix", "/usr"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    assert staged_files(tmp_path) == set()
