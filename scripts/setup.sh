#!/usr/bin/env bash
# Installs collab_fast and what it needs into a project-local virtual environment (./.venv), or into the
# virtual environment that is already active; never into the global interpreter. Safe to run again: when
# nothing changed since the last run (same sources, same pins, same extras) it installs nothing.
#
#   COLLAB_FAST_VENV=DIR   where to create the environment (default: .venv in the checkout)
#   EXTRAS=a,b             extras to install (default: train,dali,test)
#   TORCH_INDEX_URL=URL    where to take torch from (e.g. PyTorch's CPU wheel index on a machine whose
#                          pip would otherwise resolve the multi-GB CUDA build)
#
# torch: a CUDA torch that the base interpreter already has (a GPU server) is reused through
# --system-site-packages and kept; otherwise torch==2.13.0 and triton==3.7.1 (the pair CI tests) are
# installed into the environment.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
TORCH_PIN=torch==2.13.0
TRITON_PIN=triton==3.7.1   # the Triton torch 2.13 pins; CI runs the whole suite under it
EXTRAS=${EXTRAS:-train,dali,test}
BASE_PY=${PYTHON:-python3}

if [ ! -x "$PY" ]; then
    flags=()
    # Reuse the base interpreter's torch only when it is a CUDA build (a GPU server's): the venv sees it
    # but cannot modify it. A CPU-only machine gets its own pinned torch instead.
    if "$BASE_PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
        flags+=(--system-site-packages)
    fi
    echo "setup: creating the virtual environment $VENV ${flags[*]:-}"
    "$BASE_PY" -m venv "${flags[@]}" "$VENV"
fi

# The stamp: a hash of everything that decides what gets installed.
stamp_file=$VENV/.collab_fast_stamp
stamp=$( {
    echo "$EXTRAS $TORCH_PIN $TRITON_PIN ${TORCH_INDEX_URL:-}"
    git -C "$ROOT" ls-files -s pyproject.toml collab_fast 2>/dev/null || find collab_fast pyproject.toml -type f -exec sha1sum {} +
    git -C "$ROOT" diff --no-ext-diff HEAD -- pyproject.toml collab_fast 2>/dev/null || true
    # untracked files by content (a new module edited before its first commit)
    (cd "$ROOT" && git ls-files -o --exclude-standard -z -- collab_fast 2>/dev/null | xargs -0 -r sha1sum) || true
} | sha1sum | cut -c1-16)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
        && PYTHONSAFEPATH=1 "$PY" -c "import collab_fast" 2>/dev/null; then
    echo "setup: $VENV is up to date (nothing installed)"
    exit 0
fi

pip_q=(-m pip install -qq --disable-pip-version-check)
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_PIN $TRITON_PIN into $VENV"
    "$PY" "${pip_q[@]}" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "$TORCH_PIN" "$TRITON_PIN"
elif ! "$PY" -c "import triton" 2>/dev/null; then
    # A torch without triton (a CPU build): add the pinned one rather than letting the range take the newest.
    "$PY" "${pip_q[@]}" "$TRITON_PIN"
fi
# A regular (non-editable) install: what users get from a wheel. The installed torch/triton satisfy the
# package's ranges, so pip adds nothing torch-related.
echo "setup: installing collab_fast[$EXTRAS] into $VENV"
"$PY" "${pip_q[@]}" --force-reinstall --no-deps "."
"$PY" "${pip_q[@]}" ".[$EXTRAS]"
PYTHONSAFEPATH=1 "$PY" -c "import collab_fast, torch, triton; print('setup: collab_fast', collab_fast.__version__, 'torch', torch.__version__, 'triton', triton.__version__, 'in', '$VENV')"
echo "$stamp" > "$stamp_file"
