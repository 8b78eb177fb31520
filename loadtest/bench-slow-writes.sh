#!/usr/bin/env bash
# Predict latency while the state files are slow to write: a task with an active (manual) rollout between two
# generations of the PEFT fixture, evaluated every 100 ms (each evaluation writes rollouts.json), and
# closed-loop clients classifying short sentences through the rollout. Run on fresh servers, twice each,
# alternating: plainly, and with every durable write delayed by `FLYWHEEL_FAULTS=slow_write_ms=N` (a slow
# disk; the server logs each such write). Requests never wait for a write, so the P99s should match.
#
#   loadtest/bench-slow-writes.sh [seconds] [slow-write-ms] [concurrency]      (defaults 20, 200, 8)
#
# Results in target/bench/slow-writes.csv and a table on stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-20}"
slow_ms="${2:-200}"
concurrency="${3:-8}"
prepare
out=target/bench
mkdir -p "$out"
sentences "$out/texts-sentences.jsonl"
csv="$out/slow-writes.csv"
rm -f "$csv"

run() { # label faults
  local label=$1
  export FLYWHEEL_FAULTS=$2 FLYWHEEL_ROLLOUTS__EVALUATE_EVERY_MS=100
  start_server "$out/server-$label.log"
  unset FLYWHEEL_FAULTS FLYWHEEL_ROLLOUTS__EVALUATE_EVERY_MS
  mkdir -p "$data/adapters"
  cp -r tests/fixtures/peft_seq_cls "$data/adapters/stable"
  cp -r tests/fixtures/peft_seq_cls "$data/adapters/candidate"
  # A distinct generation (ids hash the config): the same weights, another (inference-irrelevant) dropout.
  python3 - "$data/adapters/candidate/adapter_config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["lora_dropout"] = 0.05
json.dump(config, open(sys.argv[1], "w"))
PY
  curl -sf "$url/v1/tasks" -H 'content-type: application/json' \
    -d '{"name":"sentiment","labels":["negative","neutral","positive"]}' >/dev/null
  curl -sf "$url/v1/adapters" -H 'content-type: application/json' \
    -d '{"path":"stable","task":"sentiment"}' >/dev/null
  local candidate
  candidate=$(curl -sf "$url/v1/adapters" -H 'content-type: application/json' \
    -d '{"path":"candidate","task":"sentiment"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  curl -sf "$url/v1/rollouts" -H 'content-type: application/json' \
    -d "{\"task\":\"sentiment\",\"candidate\":\"$candidate\",\"traffic\":0.5,\"automatic\":false}" >/dev/null
  target/release/flywheel-loadtest --url "$url" --texts "$out/texts-sentences.jsonl" --task sentiment \
    --concurrency "$concurrency" --duration "$seconds" --warmup 2 --label "$label" --csv "$csv" >/dev/null 2>&1
  local writes
  writes=$(grep -c 'injected slow write' "$out/server-$label.log" || true)
  echo "$label: $writes slow state-file writes over the server's life"
  kill "$server" && wait "$server" || true
  rm -rf "$data"
  trap - EXIT
}

# Twice each, alternating, so a drift of the machine over the minutes shows rather than biases.
for round in 1 2; do
  run "plain-$round" ""
  run "slow-write-${slow_ms}ms-$round" "slow_write_ms=$slow_ms"
done

python3 - "$csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("| run | requests/s | P50 ms | P99 ms | errors |")
print("| --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['label']} | {float(r['requests_per_second']):.1f} | {float(r['p50_ms']):.2f} | {float(r['p99_ms']):.2f} | {r['errors']} ({r['shed']} shed) |")
plain = [float(r["p99_ms"]) for r in rows if r["label"].startswith("plain")]
slow = [float(r["p99_ms"]) for r in rows if r["label"].startswith("slow")]
if plain and slow:
    print(f"mean P99 with slow writes / without: {sum(slow) / len(slow) / (sum(plain) / len(plain)):.2f}x")
PY
