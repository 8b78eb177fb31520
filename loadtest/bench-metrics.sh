#!/usr/bin/env bash
# Observability benchmarks in one run, on /v1/predict with the PEFT fixture adapter:
# 1. the server's P99 gauge (flywheel_request_latency_seconds{quantile="0.99"}, last 60 s) against the P99
#    the load generator measured from the same requests;
# 2. the cost of per-request metrics: throughput with [server] request_metrics on and off, alternated.
#
#   loadtest/bench-metrics.sh [seconds-per-point] [concurrency]     (defaults 40 and 8)
#
# Needs models/fetch.sh and datasets/fetch-spamassassin.sh. Results in target/bench/metrics.csv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-40}"
concurrency="${2:-8}"
prepare
out=target/bench
mkdir -p "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("datasets/spamassassin/easy-ham-1.jsonl")][:400]
with open(f"{sys.argv[1]}/texts-short.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps({"text": " ".join(r["text"].split()[:24])}) + "\n")
PY
csv="$out/metrics.csv"
rm -f "$csv"

# start_server ON|OFF: a fresh server with the fixture adapter as task "bench"; sets $url and $server.
start_server() {
  data=$(mktemp -d)
  mkdir -p "$data/adapters"
  cp -r tests/fixtures/peft_seq_cls "$data/adapters/fixture"
  log="$out/server-metrics-$1.log"
  FLYWHEEL_SERVER__REQUEST_METRICS=$([ "$1" = on ] && echo true || echo false) \
    target/release/flywheel serve --port 0 --data-dir "$data" >"$log" 2>&1 &
  server=$!
  wait_for_url "$log"
  labels=$(python3 -c 'import json; print(json.dumps(json.load(open("tests/fixtures/peft_seq_cls_reference.json"))["labels"]))')
  curl -sf "$url/v1/tasks" -H 'content-type: application/json' -d "{\"name\":\"bench\",\"labels\":$labels}" >/dev/null
  curl -sf "$url/v1/adapters" -H 'content-type: application/json' -d '{"path":"fixture","task":"bench"}' >/dev/null
}
stop_server() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$data"; }
trap 'stop_server' EXIT

run() { # label
  target/release/flywheel-loadtest --url "$url" --texts "$out/texts-short.jsonl" --concurrency "$concurrency" \
    --duration "$seconds" --warmup 0 --task bench --label "$1" --csv "$csv" >/dev/null
}

# 1. P99 agreement: the gauge's 60 s window covers exactly the measured requests when seconds ≤ 60.
start_server on
run p99-agreement
gauge=$(curl -sf "$url/metrics" | awk -F' ' '/^flywheel_request_latency_seconds\{route="\/v1\/predict",quantile="0.99"\}/{printf "%.2f", 1000*$2}')
loadgen=$(tail -n 1 "$csv" | cut -d, -f11)
python3 -c "g, l = $gauge, $loadgen; print(f'P99: server gauge {g:.2f} ms, load generator {l:.2f} ms, difference {100*(g-l)/l:+.1f} %')" \
  | tee "$out/p99-agreement.txt"
stop_server

# 2. Metrics cost: on, off, on, off on fresh servers, the same load each time.
for round in 1 2; do
  for mode in on off; do
    start_server "$mode"
    run "metrics-$mode-$round"
    stop_server
  done
done
python3 - "$csv" <<'PY' | tee "$out/metrics-cost.txt"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
rate = lambda mode: [float(r["requests_per_second"]) for r in rows if r["label"].startswith(f"metrics-{mode}-")]
on, off = rate("on"), rate("off")
print(f"requests/s with metrics on {on}, off {off}: on/off = {sum(on) / sum(off):.3f}")
PY
echo "results: $csv"
