"""The man pages render cleanly and document every option the commands' --help lists."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.packaging.conftest import REPO

MAN = REPO / "docs" / "man"

#: (man page, the command's module, its subcommands whose --help is read too)
PAGES = [
    ("dtprobed.8", "dtprobed", []),
    ("dtprobed-parse.1", "dtprobed.cli.parse", []),
    ("dtprobed-stash.1", "dtprobed.cli.stash", ["list", "show", "verify", "catch-up"]),
]


def help_text(module: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def man_text(page: str) -> str:
    """The page's source with roff escapes for '-' and fonts undone."""
    text = (MAN / page).read_text()
    return re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-")


@pytest.mark.parametrize(("page", "module", "subcommands"), PAGES)
def test_man_page_documents_every_option(page: str, module: str, subcommands: list[str]) -> None:
    helps = [help_text(module)] + [help_text(module, sub) for sub in subcommands]
    options = set()
    for text in helps:
        options |= set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))
    documented = man_text(page)
    missing = sorted(
        opt for opt in options if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", documented)
    )
    assert not missing, f"{page} lacks {missing}"
    for sub in subcommands:
        assert re.search(rf"^\.B {sub}$", documented, re.M), f"{page} lacks command {sub}"


@pytest.mark.parametrize("page", [p for p, _, _ in PAGES])
def test_man_page_renders_without_warnings(page: str) -> None:
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(MAN / page)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stderr == "", result.stderr
