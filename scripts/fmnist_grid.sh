#!/usr/bin/env bash
# The Fashion-MNIST study (issue #37): the paper's Table 1 / Fig. 3 comparison (ResNet-32, single / ilr2 /
# hier4, label noise, seeds paired across patterns) on a real image set that ships as a Debian package.
#
#   bash scripts/fmnist_grid.sh select OUT   # the learning rate, chosen on a 2,000-image holdout (single)
#   bash scripts/fmnist_grid.sh cpu OUT      # the reduced CPU protocol (2 cores: about 80 minutes per noise level)
#   bash scripts/fmnist_grid.sh gpu OUT      # the full protocol, many cells side by side on one GPU
#
# On a lent GPU machine (no Debian package there): copy /usr/share/datasets/fashion-mnist into a folder that
# .git/info/exclude ignores, carry it, and set FMNIST_DIR to it.
# The data: --data $FMNIST_DIR (default: the folder of `apt-get install dataset-fashion-mnist`). A grid that
# is stopped continues where it stopped when run again (finished cells are kept). Extra arguments after OUT
# go to collab_fast.grid before its "--" (e.g. --noise 0 to run one level).
set -euo pipefail
mode=${1:?usage: fmnist_grid.sh select|cpu|gpu OUT [grid flags]}
out=${2:?usage: fmnist_grid.sh select|cpu|gpu OUT [grid flags]}
shift 2
PY=${PYTHON:-python3}
data=()
[ -n "${FMNIST_DIR:-}" ] && data=(--data "$FMNIST_DIR")
# The reduced protocol: 4,000 training images (fixed, 400 a class), 20 epochs at batch 64 (1,250 steps),
# SGD momentum 0.9, wd 1e-4, cosine to 0, the paper's loss settings (T = 2, beta = 0.5, consensus detached).
small=(fashion-mnist "${data[@]}" --arch resnet32 -b 64 --epochs 20 --train-samples 4000 --schedule cosine
       --eval-every 5 --log-every 100)
case $mode in
    select)  # lr on a holdout, never the test split; the paper keeps individual learning's settings for all patterns
        exec "$PY" -m collab_fast.grid "$out" --patterns single --noise 0.4 --seeds 0 --axis lr=0.05,0.1,0.2 \
            --jobs 2 "$@" -- "${small[@]}" --holdout 2000 ;;
    cpu)
        exec "$PY" -m collab_fast.grid "$out" --patterns single,ilr2,hier4 --noise 0.6,0 --seeds 0,1,2 --jobs 2 \
            "$@" -- "${small[@]}" --lr "${FMNIST_LR:-0.1}" ;;
    gpu)  # the whole training set, 5 noise levels; 6 cells share the GPU (ResNet-32 at 28 px leaves it idle alone)
        exec "$PY" -m collab_fast.grid "$out" --patterns single,ilr2,hier4 --noise 0,0.2,0.4,0.6,0.8 --seeds 0,1,2 \
            --jobs "${FMNIST_JOBS:-6}" "$@" -- fashion-mnist "${data[@]}" --arch resnet32 -b 128 \
            --epochs "${FMNIST_EPOCHS:-30}" --schedule cosine --lr "${FMNIST_LR:-0.1}" --eval-every 5 --log-every 200 ;;
    *) echo "fmnist_grid.sh: the mode is select, cpu or gpu, got '$mode'" >&2; exit 2 ;;
esac
