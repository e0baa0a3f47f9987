#!/usr/bin/env bash
# GPU validation and measurements. A device machine may start bare for every command and keeps nothing
# between commands, so every stage first installs the package (editable, no network: the GPU image has
# torch, triton and nvcc) and builds the extension if that has not happened in this machine yet.
#
#   bash scripts/gpu_check.sh part1     # install + extension build, GPU tests (bf16, CUDA kernels), loss benchmark
#   bash scripts/gpu_check.sh part2     # install + extension build, rescale benchmark, trainer benchmark (+ compile)
# (each part fits one 10-minute command), or single stages:
#   bash scripts/gpu_check.sh install | tests | loss | rescale | train | train-compile
#
# Results land in benchmarks/results/ (written after every row) and, when $OUT is set (the device tool),
# are copied there after every stage, so a command cut off by its time limit still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage: part1, part2, install, tests, loss, rescale, train or train-compile}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
RES=benchmarks/results

copy_out() { if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp -r "$RES" "$OUT/" 2>/dev/null; fi; }

install() {
    if ! python -c "import collab_fast" 2>/dev/null; then
        pip install -q --no-deps --no-build-isolation -e . || return 1
    fi
    # builds the C++/CUDA extension once per machine (~2-3 min with nvcc), then loads it
    time python -c "from collab_fast.rescale import build_info; print(build_info())"
}

run_stage() {
    echo "=== gpu_check: $1 ($(date -u +%H:%M:%S))"
    case "$1" in
        install) install ;;
        tests) python -m pytest -q -p no:cacheprovider -k "cuda or gpu or bf16 or fp16 or compile" \
                   tests/test_collab_loss.py tests/test_rescale.py tests/test_models.py 2>&1 | tail -25
               python -m pytest -q -x -p no:cacheprovider tests/test_train.py -k "every_pattern or non_finite" 2>&1 | tail -5 ;;
        loss) python benchmarks/bench_loss.py --out "$RES" ;;
        rescale) python benchmarks/bench_rescale.py --out "$RES" ;;
        train) python benchmarks/bench_train.py --out "$RES" ;;
        train-compile) python benchmarks/bench_train.py --compile on --patterns single,hier4 --out "$RES" ;;
        *) echo "unknown stage $1" >&2; return 2 ;;
    esac
    local rc=$?
    copy_out
    return $rc
}

case "$stage" in
    part1) install && { run_stage tests; run_stage loss; } ;;
    part2) install && { run_stage rescale; run_stage train; } ;;
    install) run_stage install ;;
    *) install >/dev/null && run_stage "$stage" ;;
esac
