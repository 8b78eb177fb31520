#!/usr/bin/env bash
# Admission under ordinary load, on the shipped defaults: closed-loop clients posting one short sentence each,
# counting 429s, throughput and P99:
# - the server's first requests (64 clients from the moment /ready answers);
# - /v1/embed at concurrency 1, 8, 32 and 64;
# - /v1/predict at concurrency 16 through a LoRA adapter (the PEFT fixture);
# - both again right after a training job ends;
# - /v1/embed at concurrency 32 on a second server with admission off, the throughput baseline (the only
#   non-default setting here, and the point of comparison).
#
#   loadtest/bench-admission.sh [seconds-per-point]      (default 10)
#
# Needs models/fetch.sh and datasets/fetch-spamassassin.sh (prepare runs them). Results in
# target/bench/admission.csv and a table on stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-10}"
prepare
out=target/bench
mkdir -p "$out"
sentences "$out/texts-sentences.jsonl"
csv="$out/admission.csv"
rm -f "$csv"
texts="$out/texts-sentences.jsonl"
load() { # label concurrency seconds warmup [extra loadtest flags...]
  local label=$1 c=$2 s=$3 w=$4
  shift 4
  target/release/flywheel-loadtest --url "$url" --texts "$texts" --concurrency "$c" --duration "$s" \
    --warmup "$w" --label "$label" --csv "$csv" "$@" >/dev/null 2>&1
}

start_server "$out/server-admission.log"
grep -o 'batch cost calibrated.*' "$out/server-admission.log" || true
load first-requests 64 3 0
for c in 1 8 32 64; do
  load embed "$c" "$seconds" 2
done
mkdir -p "$data/adapters"
cp -r tests/fixtures/peft_seq_cls "$data/adapters/fixture"
curl -sf "$url/v1/tasks" -H 'content-type: application/json' \
  -d '{"name":"sentiment","labels":["negative","neutral","positive"]}' >/dev/null
curl -sf "$url/v1/adapters" -H 'content-type: application/json' -d '{"path":"fixture","task":"sentiment"}' >/dev/null
load predict-lora 16 "$seconds" 2 --task sentiment

# A LoRA job on 200 real mails; the loads start the moment it has ended.
python3 - "$url" <<'PY'
import json, sys, urllib.request
url = sys.argv[1]
def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
post("/v1/tasks", {"name": "spam", "labels": ["ham", "spam"]})
rows = lambda g: [json.loads(l) for l in open(f"datasets/spamassassin/{g}.jsonl")]
items = [{"task": "spam", "text": r["text"], "label": r["label"]} for r in rows("easy-ham-1")[:100] + rows("spam-1")[:100]]
post("/v1/feedback", {"items": items})
PY
job=$(curl -sf "$url/v1/train" -H 'content-type: application/json' -d '{"task":"spam","epochs":2,"max_length":64}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
while curl -sf "$url/v1/jobs/$job" | grep -Eq '"state":"(queued|running)"'; do sleep 0.2; done
load after-training-embed 32 3 0
load after-training-predict 16 3 0 --task sentiment
kill "$server" && wait "$server" || true
rm -rf "$data"

# The baseline, not a user's figure: the same load with admission off (the only non-default setting here), so
# the shipped defaults' c=32 throughput can be stated as a ratio of what the model does with nothing refused.
FLYWHEEL_BATCHING__MAX_EXPECTED_WAIT_MS=0 start_server "$out/server-admission-off.log"  # baseline only, see above
load embed-admission-off 32 "$seconds" 2

python3 - "$csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("| load | clients | answered | 429 | texts/s | P50 | P99 |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['label']} | {r['concurrency']} | {r['requests']} | {r['shed']} | {float(r['texts_per_second']):.1f} | "
          f"{float(r['p50_ms']):.1f} ms | {float(r['p99_ms']):.1f} ms |")
on = next(r for r in rows if r["label"] == "embed" and r["concurrency"] == "32")
off = next(r for r in rows if r["label"] == "embed-admission-off")
print(f"\nc=32 throughput, defaults / admission off: {float(on['texts_per_second']) / float(off['texts_per_second']):.2f}×")
PY
