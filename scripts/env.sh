# Sourced by the scripts: the build environment for tch against the cached PyTorch.
# shellcheck shell=bash
COHORT_CACHE="${COHORT_CACHE:-$HOME/.cache/cohort}"
export COHORT_CACHE
export VIRTUAL_ENV="$COHORT_CACHE/venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
# torch-sys finds libtorch through the virtualenv's python.
export LIBTORCH_USE_PYTORCH=1
