#!/usr/bin/env bash
# Installs collab_fast and what it needs on a fresh machine. Safe to run again.
# A torch that is already installed (a CUDA build on a GPU server) is kept; otherwise the CPU build
# 2.13.0 is installed first, so that no requirement can pull the multi-GB CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
# A regular (non-editable) install: what users get from a wheel. EXTRAS default: "test,dali".
"$PY" -m pip install --quiet ".[${EXTRAS:-test,dali}]"
PYTHONSAFEPATH=1 "$PY" -c "import collab_fast, torch, triton; print('collab_fast', collab_fast.__version__, 'from', collab_fast.__file__); print('torch', torch.__version__, 'triton', triton.__version__)"
