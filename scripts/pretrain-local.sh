#!/usr/bin/env bash
# The main job: a local coordinator and two pretraining workers train the
# tiny GPT on the State of the Union corpus for a few minutes of CPU time.
# Bootstraps PyTorch and the corpus on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

JOB="${COHORT_JOB:-jobs/tiny-sotu.toml}"
WORKERS="${COHORT_LOCAL_WORKERS:-2}"

scripts/bootstrap.sh --corpus
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release --bins --locked
bin=target/release

data=runs/data/sotu-byte
if [ ! -f "$data/manifest.json" ]; then
  "$bin/cohort-coordinator" prepare --input "$COHORT_CACHE/corpus/sotu/data" \
    --output "$data" --tokenizer byte --context-length 64 --shard-tokens 16384
fi

run_dir=runs/tiny-sotu
rm -rf "$run_dir"
mkdir -p "$run_dir"
addr_file="$run_dir/coordinator.addr"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

"$bin/cohort-coordinator" run --job "$JOB" --listen 127.0.0.1:0 --addr-file "$addr_file" &
coordinator=$!
for _ in $(seq 100); do
  [ -f "$addr_file" ] && break
  kill -0 "$coordinator" 2>/dev/null || { echo "coordinator failed to start" >&2; exit 1; }
  sleep 0.1
done
addr="http://$(cat "$addr_file")"
echo "coordinator listening on $addr; starting $WORKERS workers (logs in $run_dir/worker-N.log)"
for i in $(seq "$WORKERS"); do
  "$bin/cohort-worker" pretrain --coordinator "$addr" --data-dir "$data" --device auto \
    >"$run_dir/worker-$i.log" 2>&1 &
  pids+=($!)
done
wait "$coordinator"
for pid in "${pids[@]}"; do wait "$pid" || echo "a worker exited with an error; see $run_dir" >&2; done
pids=()
echo "per-round metrics: $run_dir/metrics.jsonl"
echo "summary: $(tail -n 1 "$run_dir/metrics.jsonl")"
