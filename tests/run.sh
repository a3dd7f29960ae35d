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
# tests/packaging: systemd-analyze and systemd itself (Debian's systemd), man and groff.
if ! command -v systemd-analyze >/dev/null || ! command -v groff >/dev/null \
    || ! command -v man >/dev/null; then
    apt-get install -y -q systemd man-db groff-base >/dev/null \
        || { apt-get update -q && apt-get install -y -q systemd man-db groff-base; }
fi
echo "== ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
echo "== mypy"
"$venv/bin/mypy"
echo "== pytest"
exec "$venv/bin/python" -m pytest "$@"
