#!/usr/bin/env bash
# GPU validation and measurements, in stages that each fit one 10-minute call of the device tool.
#   bash scripts/gpu_check.sh install      # editable install without network (the GPU image has torch, triton, nvcc)
#   bash scripts/gpu_check.sh tests        # the test suite on the GPU (bf16, > 2^31 elements, CUDA kernels, compile)
#   bash scripts/gpu_check.sh loss         # benchmarks/bench_loss.py, every shape
#   bash scripts/gpu_check.sh rescale      # benchmarks/bench_rescale.py
#   bash scripts/gpu_check.sh train        # benchmarks/bench_train.py (eager), resnet50 x patterns
#   bash scripts/gpu_check.sh train-compile
# Results land in benchmarks/results/ and, when $OUT is set (the device tool), are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage: install, tests, loss, rescale, train or train-compile}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
case "$stage" in
    install) pip install --no-deps --no-build-isolation -e . && python -c "from collab_fast.rescale import build_info; print(build_info())" ;;
    tests) python -m pytest -q -x -p no:cacheprovider tests/ 2>&1 | tail -40 ;;
    loss) python benchmarks/bench_loss.py ;;
    rescale) python benchmarks/bench_rescale.py ;;
    train) python benchmarks/bench_train.py ;;
    train-compile) python benchmarks/bench_train.py --compile on --patterns single,hier4 ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then cp -r benchmarks/results "$OUT/"; fi
