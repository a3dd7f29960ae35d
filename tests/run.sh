#!/usr/bin/env bash
# The project's test command: makes a virtualenv with the project and its test
# dependencies, then lints, type-checks and runs the whole suite.
# Usage: bash tests/run.sh [pytest args...]   (e.g. -m "not realkernel" for the fast host tests)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DTPROBED_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
# Debian packages the suite runs: systemd-analyze and systemd itself (tests/packaging),
# man and groff (man pages), gcc (the C client of tests/realkernel), unshare/nsenter
# (namespace tests). tools/cuse-vm installs qemu itself on first use.
missing=()
for need in systemd-analyze:systemd groff:groff-base man:man-db gcc:gcc \
    unshare:util-linux nsenter:util-linux; do
    command -v "${need%%:*}" >/dev/null || missing+=("${need#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -q "${missing[@]}" >/dev/null \
        || { apt-get update -q && apt-get install -y -q "${missing[@]}"; }
fi
echo "== ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
echo "== mypy"
"$venv/bin/mypy"
echo "== pytest"
exec "$venv/bin/python" -m pytest "$@"
