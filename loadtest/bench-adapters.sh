#!/usr/bin/env bash
# Adapter benchmarks in one run: load time from disk (Flywheel vs PEFT's load_adapter), and /v1/predict
# throughput at concurrency 32 with 1, 16 and 64 distinct adapters mixed in the traffic, beside base-only
# /v1/embed on the same texts.
#
#   loadtest/bench-adapters.sh [seconds-per-point]      (default 10)
#
# Needs what loadtest/bench-embed.sh needs plus peft in .venv. Results in target/bench/adapters.csv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-10}"
prepare
out=target/bench
data=$(mktemp -d)
mkdir -p "$out" "$data/adapters"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("datasets/spamassassin/easy-ham-1.jsonl")][:400]
with open(f"{sys.argv[1]}/texts-short.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps({"text": " ".join(r["text"].split()[:24])}) + "\n")
PY
peft_load=$(.venv/bin/python loadtest/make_adapters.py 64 "$data/adapters" 2>/dev/null | tail -n 1)

log="$out/server-adapters.log"
target/release/flywheel serve --port 0 --data-dir "$data" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$data"' EXIT
wait_for_url "$log"
curl -sf "$url/v1/tasks" -H 'content-type: application/json' -d '{"name":"bench","labels":["ham","spam"]}' >/dev/null
ids=()
for i in $(seq -f '%03g' 0 63); do
  id=$(curl -sf "$url/v1/adapters" -H 'content-type: application/json' \
        -d "{\"path\":\"a$i\",\"task\":\"bench\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  ids+=("$id")
done
load=$(curl -sf "$url/metrics" | awk '/^flywheel_adapter_load_duration_seconds_sum/{s=$2} /^flywheel_adapter_load_duration_seconds_count/{c=$2} END{printf "%.3f", 1000*s/c}')
echo "{\"flywheel_adapter_load_ms_mean\": $load, \"adapters\": 64, \"peft\": $peft_load}" | tee "$out/adapter-load.json"

csv="$out/adapters.csv"
rm -f "$csv"
join() { local IFS=,; echo "$*"; }
target/release/flywheel-loadtest --url "$url" --texts "$out/texts-short.jsonl" --concurrency 32 \
  --duration "$seconds" --label base-embed --csv "$csv"
for n in 1 16 64; do
  target/release/flywheel-loadtest --url "$url" --texts "$out/texts-short.jsonl" --concurrency 32 \
    --duration "$seconds" --task bench --adapters "$(join "${ids[@]:0:$n}")" --label "predict-$n-adapters" --csv "$csv"
done
echo "results: $csv $out/adapter-load.json"
