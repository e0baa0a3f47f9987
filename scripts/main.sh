#!/usr/bin/env bash
# Sets up (scripts/setup.sh: the project's virtual environment) and runs the main job on its shipped
# default: ResNet-50 with hierarchical sharing (4 heads) on the toy data set (generated on first use) at
# 64 px, to completion, then prints per-head accuracy and exports head 0 to runs/main/head0.pth.
# On a GPU it uses the GPU. Extra arguments go to the trainer (e.g. --epochs 5).
set -euo pipefail
source "$(dirname "$0")/env.sh"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
PYTHONSAFEPATH=1 "$PY" -m collab_fast.train toy --arch resnet50 --pattern hier4 --image-size 64 --epochs 3 \
    -b 32 --lr 0.05 --schedule cosine --log-every 10 --output runs/main --overwrite "$@"
