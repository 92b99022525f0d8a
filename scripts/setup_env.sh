#!/usr/bin/env bash
# Create .venv (once) and install the project with the CPU build of torch pinned, every other
# dependency at the version in constraints.txt (the set the suite is run against).
# On a CUDA machine the same pin pulls the matching CUDA wheel from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
