"""CI runs what the README tells a new user to run, in the README's order.

``.ci/run`` must be the "Set up" section's commands, nothing skipped or
added: the daemon installed first, then the suite beside it.
"""

from __future__ import annotations

import re

from tests.packaging.conftest import REPO


def readme_setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Set up\n(.*?)^## ", text, re.S | re.M)
    assert match, "README.md lacks its Set up section"
    return [line.strip() for line in match.group(1).splitlines() if line.startswith("    ")]


def ci_commands() -> list[str]:
    commands = []
    for line in (REPO / ".ci" / "run").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(("bash ", "exec bash ")):
            line = line.removeprefix("exec ").replace("</dev/null", "").strip()
            commands.append(line)
    return commands


def test_ci_runs_the_readme_setup_commands_in_order() -> None:
    assert readme_setup_commands() == ["bash packaging/install.sh", "bash tests/run.sh"]
    assert ci_commands() == readme_setup_commands()
