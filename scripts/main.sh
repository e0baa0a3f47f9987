#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job on its shipped default.
# Until the trainer lands this is the loss microbenchmark (tiny shapes on CPU, the real ones on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
PYTHONSAFEPATH=1 "$PY" benchmarks/bench_loss.py "$@"
