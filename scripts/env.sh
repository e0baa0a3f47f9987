# Sourced by setup.sh, main.sh and test.sh: the project's virtual environment and where its caches live.
# Every cache the project's commands write goes inside the environment, so that running them changes
# nothing outside the checkout and its environment (set the variables to share caches elsewhere).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${VIRTUAL_ENV:-}" ] && [ -z "${COLLAB_FAST_VENV:-}" ]; then
    VENV=$VIRTUAL_ENV
else
    VENV=${COLLAB_FAST_VENV:-$ROOT/.venv}
fi
PY=$VENV/bin/python
export COLLAB_FAST_CACHE=${COLLAB_FAST_CACHE:-$VENV/var/collab_fast}   # the C++ extension's builds
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$VENV/var/triton}           # Triton's compiled kernels
export MPLCONFIGDIR=${MPLCONFIGDIR:-$VENV/var/matplotlib}               # matplotlib's font cache
