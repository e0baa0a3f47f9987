#!/usr/bin/env bash
# The GPU validation as ONE command that fits a lent machine's budget (a bare H100/H200 image: Python, torch,
# triton, ninja, nvcc; no DALI, no network, nothing installed): at most $GPU_CHECK_BUDGET seconds of work
# (default 420 = 7 min), most important first, every stage under its own timeout, output teed as it goes.
#
#   bash scripts/gpu_check.sh             # on a GPU machine (the device tool sets $OUT)
#   bash scripts/gpu_check.sh --dry-run   # anywhere: the same stages at tiny sizes on CPU (what CI runs)
#
# Stages (estimated on an H100 with 16 cores; each capped at its timeout and at what is left of the budget):
#   env        ~5 s    GPU, driver, versions                              -> check.log
#   build      ~60-120 s in the background: the C++/CUDA extension (nvcc), while the loss tests run
#   loss-tests ~90-150 s the whole tests/test_collab_loss.py on the GPU (fp32/bf16/fp16, long rows) -> tests.log
#   ops-tests  ~30-60 s tests/test_rescale.py on CUDA (fused kernel; the ATen path is checked on CPU in CI)
#   train      ~60-90 s resnet50 hier4, bf16, channels-last, synthetic, 60 steps: the loss must fall -> run.log
#   bench-loss ~60-90 s bench_loss.py (kernel-only and whole-call rows, eager, floor)  -> bench_loss.json
#   bench-train ~90-120 s bench_train.py plain/single/ilr2/hier4 at batch 256           -> bench_train.json
#   bench-rescale ~20-40 s bench_rescale.py                                             -> bench_rescale.json
# At most 6 files land in $OUT (check.log, tests.log, run.log and the three JSON results), each written as the
# stage runs, so a command cut off by its limit still returns everything finished before.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
OUT=${OUT:-$ROOT/benchmarks/results/gpu_check}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/collab_fast_gpu_check.XXXXXX)}
BUDGET=${GPU_CHECK_BUDGET:-420}
mkdir -p "$OUT" "$WORK/results"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}   # no install: the checkout is the package
export COLLAB_FAST_CACHE=$WORK/cache TRITON_CACHE_DIR=$WORK/triton MPLCONFIGDIR=$WORK/mpl
export PYTHONUNBUFFERED=1
LOG=$OUT/check.log
START=$(date +%s)
: > "$LOG"

say() { echo "gpu_check: $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    [ $DRY = 1 ] && say "--dry-run on a GPU machine: tiny shapes on CPU all the same"
elif [ $DRY = 0 ]; then
    say "no CUDA device is visible to $PY (torch.cuda.is_available() is false); nothing to validate here." \
        "Use --dry-run for the CPU rehearsal."
    exit 2
fi
if [ $DRY = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
fi

# stage NAME TIMEOUT LOGFILE CMD...: runs CMD under min(TIMEOUT, budget left), teed into LOGFILE.
FAILED=()
stage() {
    local name=$1 limit=$2 logfile=$3; shift 3
    local rest; rest=$(left)
    if [ "$rest" -lt 15 ]; then say "$name: skipped (budget spent)"; FAILED+=("$name:skipped"); return; fi
    [ "$limit" -gt "$rest" ] && limit=$rest
    say "$name: start ($(date -u +%H:%M:%S), limit ${limit}s)"
    local t0; t0=$(date +%s)
    { echo "=== $name: $*"; } >> "$logfile"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$logfile" | tail -n 3
    local rc=${PIPESTATUS[0]}
    local dt=$(( $(date +%s) - t0 ))
    if [ "$rc" = 0 ]; then say "$name: ok in ${dt}s"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "$name: TIMED OUT after ${dt}s"; FAILED+=("$name:timeout")
    else say "$name: FAILED (exit $rc) in ${dt}s"; FAILED+=("$name:$rc"); fi
    cp "$WORK"/results/*.json "$OUT"/ 2>/dev/null || true   # results so far, after every stage
}

# --- env
stage env 30 "$LOG" "$PY" - <<'PYEOF'
import os, platform, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
          "smem/block", getattr(p, "shared_memory_per_block_optin", "?"), "driver cuda",
          torch._C._cuda_getDriverVersion())
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip())
    except Exception:
        pass
print("cpus", os.cpu_count())
for mod in ("pytest", "numpy", "ninja", "timm", "nvidia.dali"):
    try:
        __import__(mod)
        print(mod, "ok")
    except Exception:
        print(mod, "missing")
PYEOF

# --- build (background)
"$PY" -c "from collab_fast.rescale import build_info; print('build_info', build_info())" > "$WORK/build.log" 2>&1 &
BUILD_PID=$!
say "build: started in the background (pid $BUILD_PID)"

PYTEST=("$PY" -m pytest -p no:cacheprovider -rfE --color=no)
if [ $DRY = 1 ]; then
    # the rehearsal collects every test (imports, fixtures, markers) and runs a small sample on CPU
    stage loss-tests 300 "$OUT/tests.log" "${PYTEST[@]}" -q -x tests/test_collab_loss.py -k "kernel_matches_reference or bad_input or loop_stages"
else
    stage loss-tests 180 "$OUT/tests.log" "${PYTEST[@]}" -v tests/test_collab_loss.py
fi

rest=$(left); [ "$rest" -gt 0 ] || rest=1
if timeout "$rest" bash -c "while kill -0 $BUILD_PID 2>/dev/null; do sleep 1; done"; then
    wait "$BUILD_PID"; brc=$?
    cat "$WORK/build.log" >> "$LOG"
    if [ "$brc" = 0 ]; then say "build: ok"; else say "build: FAILED (exit $brc)"; FAILED+=("build:$brc"); fi
else
    say "build: still running when the budget ran out"; FAILED+=("build:timeout")
fi

if [ $DRY = 1 ]; then
    stage ops-tests 300 "$OUT/tests.log" "${PYTEST[@]}" -q -x tests/test_rescale.py -k "exact or alias or layouts"
    stage train 300 "$OUT/run.log" "$PY" -m collab_fast.train synthetic --device cpu --arch resnet18 --pattern hier4 \
        -b 4 --image-size 32 --max-steps 3 --synthetic-steps 3 --log-every 1 --progress lines --output "$WORK/run"
    stage bench-loss 300 "$OUT/run.log" "$PY" benchmarks/bench_loss.py --quick --out "$WORK/results"
    stage bench-train 300 "$OUT/run.log" "$PY" benchmarks/bench_train.py --quick --out "$WORK/results"
    stage bench-rescale 300 "$OUT/run.log" "$PY" benchmarks/bench_rescale.py --quick --out "$WORK/results"
else
    stage ops-tests 90 "$OUT/tests.log" "${PYTEST[@]}" -v tests/test_rescale.py -m "not slow" \
        -k "not damaged and not no_nvcc_build and not no_compiler"
    stage train 120 "$OUT/run.log" "$PY" -m collab_fast.train synthetic --device cuda --arch resnet50 --pattern hier4 \
        -b 128 --image-size 224 --max-steps 60 --synthetic-steps 60 --log-every 10 --progress lines \
        --output "$WORK/run"
    stage bench-loss 100 "$OUT/run.log" "$PY" benchmarks/bench_loss.py --out "$WORK/results"
    stage bench-train 150 "$OUT/run.log" "$PY" benchmarks/bench_train.py --patterns plain,single,ilr2,hier4 \
        --batch-size 256 --steps 20 --warmup 5 --out "$WORK/results"
    stage bench-rescale 40 "$OUT/run.log" "$PY" benchmarks/bench_rescale.py --out "$WORK/results"
fi
# the training run's loss must fall: first vs last logged record
if [ -f "$WORK/run/metrics.jsonl" ]; then
    "$PY" - "$WORK/run/metrics.jsonl" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
tr = [r for r in map(json.loads, open(sys.argv[1])) if r.get("kind") == "train"]
if tr:
    first, last = tr[0]["loss"], tr[-1]["loss"]
    print(f"gpu_check: train loss {first:.3f} -> {last:.3f} over {tr[-1]['step']} steps, "
          f"{tr[-1].get('img_per_s', 0):.0f} img/s, peak {tr[-1].get('peak_mem_mb', tr[-1].get('peak_rss_mb', 0)):.0f} MB")
PYEOF
fi
say "done in $(( $(date +%s) - START ))s; ${#FAILED[@]} stage(s) not ok: ${FAILED[*]:-none}; files: $(ls "$OUT" | tr '\n' ' ')"
[ ${#FAILED[@]} = 0 ]
