#!/usr/bin/env bash
# Sets up (scripts/setup.sh: the project's virtual environment) and runs the test suite against the
# installed package. Arguments go to pytest. Without a GPU the Triton kernels run in Triton's interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1).
set -euo pipefail
source "$(dirname "$0")/env.sh"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# One pytest-xdist worker per core, at most 8 (COLLAB_FAST_TEST_WORKERS=N to choose, 1 for one process; a
# -n among the arguments wins). tests/conftest.py gives each worker its share of torch's threads.
workers=${COLLAB_FAST_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
[ "$workers" -gt 8 ] && workers=8
xdist=()
if [ "$workers" -gt 1 ]; then
    if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n "$workers")
    else echo "test: pytest-xdist is not installed (the test extra): one process"; fi
fi
# PYTHONSAFEPATH: import the installed package, not the source tree in the working directory.
PYTHONSAFEPATH=1 "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" "$@"
