#!/usr/bin/env bash
# The GPU validation as ONE command that fits a lent machine's budget (a bare H100/H200 image: Python, torch,
# triton, ninja, nvcc; no DALI, no network, nothing installed): at most $GPU_CHECK_BUDGET seconds of work
# (default 450), every stage under its own timeout, output teed as it goes.
#
#   bash scripts/gpu_check.sh             # on a GPU machine (the device tool sets $OUT)
#   bash scripts/gpu_check.sh --dry-run   # anywhere: the same stages at tiny sizes on CPU (what CI runs)
#
# Two phases (estimates for an H100/H200 with 16 cores):
#   A. correctness, three lanes at once (nothing in them is timed, so they may share the GPU):
#      lane 1  loss-tests     tests/test_collab_loss.py (fp32/bf16/fp16, long rows; xdist when present) -> tests.log
#      lane 2  linear-tests   tests/test_fused_linear.py + test_mix.py on CUDA, then (after the
#              build) ops-tests: tests/test_rescale.py on CUDA                                       -> tests2.log
#      lane 3  build (the C++/CUDA extension with nvcc), then train: resnet50 hier4, bf16, channels-last,
#              synthetic, 60 steps; the loss must fall                                                -> run.log
#   B. timing, one stage at a time, alone on the GPU (bench rows are written after every row/shape):
#      train-graph    the trainer with --cuda-graphs (the whole step captured): hier4, 60 steps, the loss must fall
#      bench-train    plain/single/hier4 at batch 32 and 256, eager and captured (--cuda-graphs) -> bench_train.json
#      host-profile   where a whole loss call's host time goes (ImageNet shape)               -> run.log
#      bench-loss     kernel-only and whole-call rows, eager, compiled, ours-compiled (Inductor launching the
#                     kernel; the last two at the ImageNet shape), floor                     -> bench_loss.json
#      bench-linear   fused linear + collaborative loss at LM vocabularies: memory and time -> bench_fused_linear.json
#      bench-rescale  the split-point gradient sum                                           -> bench_rescale.json
#      sweep          the loss kernel's block / warps / prefetch at the LM shapes            -> bench_loss_sweep.json
#   If the ops tests crash, ops-diag (scripts/diag_cpp_exception.py) runs after them.
#   GPU_CHECK_SKIP="name ..." leaves stages out (a rerun of what failed or changed).
# At most 8 files land in $OUT (check.log, tests.log, tests2.log, run.log and the JSON results, or where those
# would make more than 8, results.tar holding them), each written as its stage runs, so a command cut off by its
# limit still returns everything finished before.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
OUT=${OUT:-$ROOT/benchmarks/results/gpu_check}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/collab_fast_gpu_check.XXXXXX)}
BUDGET=${GPU_CHECK_BUDGET:-450}
mkdir -p "$OUT" "$WORK/results"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}   # no install: the checkout is the package
export TRITON_CACHE_DIR=$WORK/triton MPLCONFIGDIR=$WORK/mpl
# The C++ extension's builds: on the GPU machine a fresh cache (the build is one of the checks); a dry run
# keeps the caller's COLLAB_FAST_CACHE where one is set (scripts/env.sh's, whose build is published), so
# the rehearsal loads it instead of compiling again.
if [ $DRY = 0 ] || [ -z "${COLLAB_FAST_CACHE:-}" ]; then export COLLAB_FAST_CACHE=$WORK/cache; fi
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

# GPU_CHECK_SKIP="bench-train bench-loss": stages not to run this time (a rerun of what failed or changed).
SKIP=" ${GPU_CHECK_SKIP:-} "
skipped() { case "$SKIP" in *" $1 "*) say "$1: skipped (GPU_CHECK_SKIP)"; return 0;; esac; return 1; }

# stage NAME TIMEOUT LOGFILE CMD...: runs CMD under min(TIMEOUT, budget left), its output appended to LOGFILE
# (in the foreground also shown, its last lines; in a background lane, LANE=1, only logged); the verdict goes
# to $WORK/status, and the JSON results so far to $OUT after every stage. The one stage runner of both phases.
stage() {
    local name=$1 limit=$2 logfile=$3; shift 3
    skipped "$name" && return
    local rest; rest=$(left)
    if [ "$rest" -lt 15 ]; then say "$name: skipped (budget spent)"; echo "$name:skipped" >> "$WORK/status"; return; fi
    [ "$limit" -gt "$rest" ] && limit=$rest
    say "$name: start ($(date -u +%H:%M:%S), limit ${limit}s)"
    local t0; t0=$(date +%s)
    { echo "=== $name: $*"; } >> "$logfile"
    if [ -n "${LANE:-}" ]; then
        timeout --kill-after=10 "$limit" "$@" >> "$logfile" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$logfile" | tail -n 3
        (exit "${PIPESTATUS[0]}")
    fi
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ "$rc" = 0 ]; then say "$name: ok in ${dt}s"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "$name: TIMED OUT after ${dt}s"; echo "$name:timeout" >> "$WORK/status"
    else say "$name: FAILED (exit $rc) in ${dt}s; last lines:"; tail -n 4 "$logfile" | tee -a "$LOG"
         echo "$name:$rc" >> "$WORK/status"; fi
    cp "$WORK"/results/*.json "$OUT"/ 2>/dev/null || true
    # more files than the device tool returns (4 logs + 5 results when every stage ran): the results travel
    # as one tar (JSON and markdown) instead
    if [ "$(ls "$OUT" | wc -l)" -gt 8 ]; then
        tar -cf "$OUT/results.tar" -C "$WORK/results" . && rm -f "$OUT"/*.json
    fi
}
: > "$WORK/status"

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
    from collab_fast.data.dali import driver_cuda
    print("gpu", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
          "smem/block", getattr(p, "shared_memory_per_block_optin", "?"), "driver supports CUDA", driver_cuda())
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,"
                              "utilization.gpu", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip())
    except Exception:
        pass
print("cpus", os.cpu_count())
for mod in ("pytest", "xdist", "numpy", "ninja", "timm", "nvidia.dali"):
    try:
        __import__(mod)
        print(mod, "ok")
    except Exception:
        print(mod, "missing")
PYEOF

PYTEST=("$PY" -m pytest -p no:cacheprovider -rfE --color=no)
XDIST=(); XDIST4=(); XDIST2=()
if [ $DRY = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); XDIST4=(-n 4); XDIST2=(-n 2); fi

build() {  # the extension, with nvcc where there is one; ops-tests and train wait for it (LANE=1: in a lane)
    stage build 180 "$OUT/run.log" "$PY" -c "from collab_fast.rescale import build_info; print('build_info', build_info())"
    touch "$WORK/built"
}
wait_built() { while [ ! -f "$WORK/built" ] && [ "$(left)" -gt 15 ]; do sleep 1; done; }

# --- phase A: correctness, three lanes
if [ $DRY = 1 ]; then
    ( LANE=1; stage loss-tests 300 "$OUT/tests.log" "${PYTEST[@]}" -q -x tests/test_collab_loss.py \
          -k "kernel_matches_reference or bad_input or loop_stages" ) &
    L1=$!
    ( LANE=1; stage linear-tests 300 "$OUT/tests2.log" "${PYTEST[@]}" -q -x tests/test_fused_linear.py \
          tests/test_mix.py -k "materialised and triton or equals_the_two_call"
      wait_built
      stage ops-tests 300 "$OUT/tests2.log" "${PYTEST[@]}" -q -x tests/test_rescale.py -k "exact or alias or layouts" ) &
    L2=$!
    ( LANE=1; build
      stage train 300 "$OUT/run.log" "$PY" -m collab_fast.train synthetic --device cpu --arch resnet18 --pattern hier4 \
          -b 4 --image-size 32 --max-steps 3 --synthetic-steps 3 --log-every 1 --progress lines --output "$WORK/run" ) &
    L3=$!
else
    ( LANE=1; stage loss-tests 200 "$OUT/tests.log" "${PYTEST[@]}" "${XDIST[@]}" -v tests/test_collab_loss.py ) &
    L1=$!
    ( LANE=1; stage linear-tests 120 "$OUT/tests2.log" "${PYTEST[@]}" "${XDIST4[@]}" -v \
          tests/test_fused_linear.py tests/test_mix.py -k "not trainer"
      wait_built
      # under xdist a worker that crashes is replaced and the rest still run
      stage ops-tests 90 "$OUT/tests2.log" "${PYTEST[@]}" "${XDIST2[@]}" -v tests/test_rescale.py -m "not slow" \
          -k "not damaged and not no_nvcc_build and not no_compiler"
      if grep -q -e "crashed" -e "Segmentation fault" -e "Fatal Python error" "$OUT/tests2.log"; then
          stage ops-diag 150 "$OUT/tests2.log" "$PY" scripts/diag_cpp_exception.py
      fi ) &
    L2=$!
    ( LANE=1; build
      stage train 120 "$OUT/run.log" "$PY" -m collab_fast.train synthetic --device cuda --arch resnet50 \
          --pattern hier4 -b 128 --image-size 224 --max-steps 60 --synthetic-steps 60 --log-every 10 \
          --progress lines --output "$WORK/run" ) &
    L3=$!
fi
wait $L1 $L2 $L3
# a training run's loss must fall: first vs last logged record (RUN_DIR, what the run was)
falls() {
    [ -f "$1/metrics.jsonl" ] || return 0
    "$PY" - "$1/metrics.jsonl" "$2" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
tr = [r for r in map(json.loads, open(sys.argv[1])) if r.get("kind") == "train"]
if tr:
    first, last = tr[0]["loss"], tr[-1]["loss"]
    print(f"gpu_check: {sys.argv[2]}: train loss {first:.3f} -> {last:.3f} over {tr[-1]['step']} steps "
          f"({'falls' if last < first else 'DOES NOT FALL'}), {tr[-1].get('img_per_s', 0):.0f} img/s, "
          f"peak {tr[-1].get('peak_mem_mb', tr[-1].get('peak_rss_mb', 0)):.0f} MB")
PYEOF
}
falls "$WORK/run" "train (the test lanes shared the GPU: not a timing)"

# --- phase B: timing, alone on the GPU
if [ $DRY = 1 ]; then
    stage train-graph 300 "$OUT/run.log" "$PY" -m collab_fast.train synthetic --device cpu --arch resnet18 \
        --pattern hier4 -b 4 --image-size 32 --max-steps 6 --synthetic-steps 6 --log-every 1 --progress lines \
        --model-ema 0.99 --cuda-graphs --output "$WORK/run-graph"
    falls "$WORK/run-graph" "train-graph (--cuda-graphs)"
    stage bench-train 300 "$OUT/run.log" "$PY" benchmarks/bench_train.py --quick --modes eager,graph --out "$WORK/results"
    stage host-profile 300 "$OUT/run.log" "$PY" benchmarks/bench_loss.py --host-profile
    stage bench-loss 300 "$OUT/run.log" "$PY" benchmarks/bench_loss.py --quick --compiled-shapes none --out "$WORK/results"
    stage bench-linear 300 "$OUT/run.log" "$PY" benchmarks/bench_fused_linear.py --quick --out "$WORK/results"
    stage bench-rescale 300 "$OUT/run.log" "$PY" benchmarks/bench_rescale.py --quick --out "$WORK/results"
else
    stage train-graph 60 "$OUT/run.log" "$PY" -m collab_fast.train synthetic --device cuda --arch resnet50 \
        --pattern hier4 -b 128 --image-size 224 --max-steps 60 --synthetic-steps 60 --log-every 10 \
        --progress lines --model-ema 0.999 --cuda-graphs --output "$WORK/run-graph"
    falls "$WORK/run-graph" "train-graph (--cuda-graphs, alone on the GPU)"
    stage bench-train 200 "$OUT/run.log" "$PY" benchmarks/bench_train.py --patterns plain,single,hier4 \
        --batch-size 32,256 --modes eager,graph --steps 20 --warmup 5 --out "$WORK/results"
    stage host-profile 40 "$OUT/run.log" "$PY" benchmarks/bench_loss.py --host-profile
    stage bench-loss 140 "$OUT/run.log" "$PY" benchmarks/bench_loss.py --compiled-shapes imagenet --out "$WORK/results"
    stage bench-linear 45 "$OUT/run.log" "$PY" benchmarks/bench_fused_linear.py --out "$WORK/results"
    stage bench-rescale 30 "$OUT/run.log" "$PY" benchmarks/bench_rescale.py --out "$WORK/results"
    stage sweep 150 "$OUT/run.log" "$PY" benchmarks/bench_loss.py --sweep --out "$WORK/results"
fi
FAILED=()
while read -r f; do [ -n "$f" ] && FAILED+=("$f"); done < "$WORK/status"
say "done in $(( $(date +%s) - START ))s; ${#FAILED[@]} stage(s) not ok: ${FAILED[*]:-none}; files: $(ls "$OUT" | tr '\n' ' ')"
[ ${#FAILED[@]} = 0 ]
