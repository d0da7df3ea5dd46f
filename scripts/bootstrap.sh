#!/usr/bin/env bash
# Installs what Cohort needs that cargo cannot fetch, idempotently:
#   - PyTorch 2.11.0 (for tch 0.24) into a cached virtualenv,
#   - the public-domain pretraining corpus, checked by sha256.
# Prints `export` lines for the build environment when called with --print-env.
set -euo pipefail

COHORT_CACHE="${COHORT_CACHE:-$HOME/.cache/cohort}"
VENV="$COHORT_CACHE/venv"
TORCH_VERSION="2.11.0"

log() { printf 'bootstrap: %s\n' "$*" >&2; }

ensure_torch() {
  if [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
    return
  fi
  log "installing torch==$TORCH_VERSION into $VENV (about 4.7 GB, once)"
  mkdir -p "$COHORT_CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
}

ensure_torch
