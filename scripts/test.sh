#!/usr/bin/env bash
# Sets up (scripts/setup.sh: the project's virtual environment) and runs the test suite against the
# installed package. Arguments go to pytest. Without a GPU the Triton kernels run in Triton's interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1).
set -euo pipefail
source "$(dirname "$0")/env.sh"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# PYTHONSAFEPATH: import the installed package, not the source tree in the working directory.
PYTHONSAFEPATH=1 "$PY" -m pytest -q -p no:cacheprovider "$@"
