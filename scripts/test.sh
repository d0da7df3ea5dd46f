#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, service and end-to-end tests.
# Installs PyTorch 2.11.0 into the cache on first use (see bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

scripts/check-deploy.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the real binaries: build them first.
cargo build --workspace --bins --locked
cargo test --workspace --locked
