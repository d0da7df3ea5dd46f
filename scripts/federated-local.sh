#!/usr/bin/env bash
# Federated fine-tuning on one machine, the whole story:
#   1. pretrain the tiny GPT briefly on the State of the Union corpus
#      (coordinator + 2 workers; skipped when its checkpoint exists);
#   2. split Shakespeare into 8 client sites, one (play, role) each, with an
#      enrollment token per site (`prepare-federated`);
#   3. fine-tune LoRA adapters across the 8 sites with differential privacy:
#      each round samples clients with probability 0.5, they train on their
#      own lines, clip and noise their update, and the coordinator charges
#      the privacy ledger before it releases the aggregate;
#   4. the same for sentiment classification: 8 sites holding labeled
#      sentences of one domain each (movies, restaurants, products) train
#      LoRA adapters and a small head on the pretrained model, and every
#      round reports held-out accuracy.
# Usage: scripts/federated-local.sh [distributed|central|local|none]
#   distributed (default): clients add shares of the noise, ε ≈ 8 for the released sums
#   central: clients clip, the coordinator adds the noise, ε ≈ 8
#   local:   every client adds the full noise, ε ≈ 8 per client against anyone
#   none:    plain FedAvg, no clipping, no noise (the utility baseline)
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-${COHORT_DP_MODE:-distributed}}"
ROUNDS=30
RATE=0.5
case "$MODE" in
  distributed | central | none | local) ;;
  *) echo "usage: $0 [distributed|central|local|none]" >&2; exit 2 ;;
esac

scripts/bootstrap.sh --corpus
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release --bins --locked
bin="${CARGO_TARGET_DIR:-target}/release"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# Starts a coordinator for job $1 writing its address to $2; sets $addr.
start_coordinator() {
  local job=$1 addr_file=$2 log=$3
  rm -f "$addr_file"
  "$bin/cohort-coordinator" run --job "$job" --listen 127.0.0.1:0 --addr-file "$addr_file" \
    >"$log" 2>&1 &
  coordinator=$!
  pids+=("$coordinator")
  for _ in $(seq 200); do
    [ -f "$addr_file" ] && break
    kill -0 "$coordinator" 2>/dev/null || { cat "$log" >&2; echo "coordinator failed to start" >&2; exit 1; }
    sleep 0.1
  done
  addr="http://$(cat "$addr_file")"
}

# 1. Brief pretraining.
base=runs/fed-pretrain/checkpoint-000060.safetensors
if [ ! -f "$base" ]; then
  data=runs/data/sotu-byte
  if [ ! -f "$data/manifest.json" ]; then
    "$bin/cohort-coordinator" prepare --input "$COHORT_CACHE/corpus/sotu/data" \
      --output "$data" --tokenizer byte --context-length 64 --shard-tokens 16384
  fi
  rm -rf runs/fed-pretrain && mkdir -p runs/fed-pretrain
  echo "1/4 pretraining the tiny GPT for 60 rounds (log: runs/fed-pretrain/coordinator.log)"
  start_coordinator jobs/fed-pretrain.toml runs/fed-pretrain/addr runs/fed-pretrain/coordinator.log
  for i in 1 2; do
    "$bin/cohort-worker" pretrain --coordinator "$addr" --data-dir "$data" --device auto \
      >"runs/fed-pretrain/worker-$i.log" 2>&1 &
    pids+=($!)
  done
  wait "$coordinator"
fi
echo "1/4 base model: $base"

# 2. Client sites: Shakespeare roles (text) and sentiment domains (labeled).
clients=runs/fed-clients
if [ ! -f "$clients/enrollment.toml" ]; then
  "$bin/cohort-coordinator" prepare-federated --plays "$COHORT_CACHE/corpus/shakespeare" \
    --out "$clients" --clients 8
fi
sentiment_clients=runs/fed-sentiment-clients
if [ ! -f "$sentiment_clients/enrollment.toml" ]; then
  "$bin/cohort-coordinator" prepare-federated --sentiment "$COHORT_CACHE/corpus/sentiment" \
    --out "$sentiment_clients" --clients 8
fi
echo "2/4 client sites: $(grep -c '^\[\[client\]\]' "$clients/enrollment.toml") in $clients," \
  "$(grep -c '^\[\[client\]\]' "$sentiment_clients/enrollment.toml") in $sentiment_clients"

# 3. The federated job, with the DP section for the chosen mode.
case "$MODE" in
  distributed) dp=$'mode = "distributed"\nclip_norm = 0.5\nnoise_multiplier = 1.95\nepsilon = 8.0\ndelta = 1e-5' ;;
  central) dp=$'mode = "central"\nclip_norm = 0.5\nnoise_multiplier = 1.95\nepsilon = 8.0\ndelta = 1e-5' ;;
  # Per client, against anyone: no amplification by sampling (the
  # coordinator knows who was sampled) and sensitivity 2C (any two datasets
  # of the site): σ/2 = 3.5 gives ε ≈ 8 over 30 participations at q = 1.
  local) dp=$'mode = "local"\nclip_norm = 0.5\nnoise_multiplier = 7.0\nepsilon = 8.0\ndelta = 1e-5' ;;
  none) dp=$'mode = "none"' ;;
esac
# Runs federated job $1 (a jobs/ file, name $2) over the sites in $3 with
# the DP section above, then prints the per-round table from metrics.jsonl.
federate() {
  local template=$1 name=$2 sites=$3
  local run_dir=runs/$name-$MODE job=runs/$name-$MODE.toml
  sed -e "s|^run_dir = .*|run_dir = \"$name-$MODE\"|" -e 's|"\.\./runs/|"|' \
    -e '/^\[federated\.dp\]/,$d' "$template" >"$job"
  printf '[federated.dp]\n%s\n' "$dp" >>"$job"
  rm -rf "$run_dir" && mkdir -p "$run_dir"
  start_coordinator "$job" "$run_dir/addr" "$run_dir/coordinator.log"
  for site in "$sites"/*/; do
    local site_name
    site_name=$(basename "$site")
    "$bin/cohort-worker" federated --coordinator "$addr" --data "$site" \
      --token-file "$site/token" --device auto --threads 1 >"$run_dir/$site_name.log" 2>&1 &
    pids+=($!)
  done
  wait "$coordinator"
  local status=0
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || status=1; done
  pids=()
  [ "$status" = 0 ] || echo "a process exited with an error; see $run_dir" >&2

  python3 - "$run_dir/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rounds = [r for r in rows if "sampled" in r]
accuracy = any(r.get("eval_accuracy") is not None for r in rows)
num = lambda v, f: "-" if v is None else format(v, f)
print(f"{'round':>5} {'sampled':>7} {'pushed':>6} {'update norm':>11} {'eval loss':>9}"
      + (f" {'accuracy':>8}" if accuracy else "") + f" {'ε spent':>8}")
for r in rounds:
    print(f"{r['round']:>5} {r['sampled']:>7} {r['participants']:>6} {r['mean_update_norm']:>11.4f} "
          f"{num(r['eval_loss'], '.4f'):>9}"
          + (f" {num(r.get('eval_accuracy'), '.1%'):>8}" if accuracy else "")
          + f" {num(r.get('epsilon_spent'), '.3f'):>8}")
final = [r for r in rows if r.get("final")]
if final:
    f = final[-1]
    line = f"final (every site's test split, version {f['version']}): eval loss {num(f['eval_loss'], '.4f')}"
    if f.get("eval_accuracy") is not None:
        line += f", accuracy {f['eval_accuracy']:.1%}"
    print(line)
PY
}

echo "3/4 federated next-token fine-tuning on Shakespeare, DP mode $MODE, $ROUNDS rounds at q = $RATE (logs in runs/fed-shakespeare-$MODE)"
federate jobs/fed-shakespeare.toml fed-shakespeare "$clients"
echo "4/4 federated sentiment classification, DP mode $MODE, $ROUNDS rounds at q = $RATE (logs in runs/fed-sentiment-$MODE)"
federate jobs/fed-sentiment.toml fed-sentiment "$sentiment_clients"
