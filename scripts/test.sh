#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite against the installed package.
# Without a GPU the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
# PYTHONSAFEPATH: import the installed package, not the source tree in the working directory.
PYTHONSAFEPATH=1 "$PY" -m pytest -q "$@"
