#!/usr/bin/env bash
# Re-resolve the dependency set from the ranges in pyproject.toml in a fresh venv and write it to
# constraints.txt (what setup_env.sh and CI install). Run the suite on the result before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=$(mktemp -d)/venv
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q ".[test]"
{
    sed -n '1,3p' constraints.txt
    "$VENV/bin/python" -m pip freeze --exclude blockptq | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
rm -rf "$(dirname "$VENV")"
git diff --stat constraints.txt || true
