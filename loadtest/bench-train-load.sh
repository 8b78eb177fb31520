#!/usr/bin/env bash
# Serving while training: P99 of a steady /v1/predict load (open loop, a constant request rate) without a
# training job, then with one running (a LoRA job on 400 real mails; the trainer has its [trainer] threads
# share, 1 by default, and yields to inference in flight, [trainer] yield_to_serving_ms).
#
#   loadtest/bench-train-load.sh [seconds-per-point] [requests-per-second] [yield-ms]   (defaults 30, 12, 250)
#
# The rate should be one the server sustains (the closed-loop capacity of these texts is ~30 req/s here);
# at a saturating rate every latency is queueing, with or without training. yield-ms 0 turns yielding off.
#
# Needs models/fetch.sh and datasets/fetch-spamassassin.sh. Results in target/bench/train-load.csv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-30}"
rate="${2:-12}"
yield_ms="${3:-250}"
prepare
out=target/bench
mkdir -p "$out"
export FLYWHEEL_TRAINER__YIELD_TO_SERVING_MS="$yield_ms"
start_server "$out/server-train-load.log"
python3 - "$out" "$url" <<'PY'
import json, sys, urllib.request
out, url = sys.argv[1], sys.argv[2]
def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
post("/v1/tasks", {"name": "spam", "labels": ["ham", "spam"]})
rows = lambda g: [json.loads(l) for l in open(f"datasets/spamassassin/{g}.jsonl")]
ham, spam = rows("easy-ham-1"), rows("spam-1")
items = [{"task": "spam", "text": r["text"], "label": r["label"]} for r in ham[:200] + spam[:200]]
post("/v1/feedback", {"items": items})
with open(f"{out}/texts-mail.jsonl", "w") as f:
    for r in ham[1000:1400]:
        f.write(json.dumps({"text": " ".join(r["text"].split()[:60])}) + "\n")
PY
wait_job() {
  while curl -sf "$url/v1/jobs/$1" | grep -Eq '"state":"(queued|running)"'; do sleep 1; done
}
# A first, short job gives the task its stable generation to serve.
job=$(curl -sf "$url/v1/train" -H 'content-type: application/json' \
  -d '{"task":"spam","epochs":1,"max_length":48}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
wait_job "$job"
csv="$out/train-load.csv"
rm -f "$csv"
load() {
  target/release/flywheel-loadtest --url "$url" --texts "$out/texts-mail.jsonl" --rate "$rate" --concurrency 32 \
    --duration "$seconds" --task spam --label "$1" --csv "$csv" >/dev/null
}
load idle
# A long job (all 400 mails, 128 tokens, 10 epochs, no warm start) that outlasts the measured load.
job=$(curl -sf "$url/v1/train" -H 'content-type: application/json' \
  -d '{"task":"spam","epochs":10,"max_length":128,"warm_start":false,"patience":10}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
sleep 5
load training
state=$(curl -sf "$url/v1/jobs/$job" | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["state"], j["step"], "/", j["total_steps"], "steps,", round(j["wall_seconds"]), "s of which", round(j.get("yielded_seconds", 0)), "s yielded")')
curl -sf -X DELETE "$url/v1/jobs/$job" >/dev/null
python3 - "$csv" "$state" "$rate" "$yield_ms" <<'PY' | tee "$out/train-load.txt"
import csv, sys
rows = {r["label"]: r for r in csv.DictReader(open(sys.argv[1]))}
idle, busy = float(rows["idle"]["p99_ms"]), float(rows["training"]["p99_ms"])
print(f"{sys.argv[3]} req/s, yield {sys.argv[4]} ms: predict P99 idle {idle:.1f} ms, during training {busy:.1f} ms: {busy / idle:.2f}x "
      f"(throughput {rows['idle']['requests_per_second']} vs {rows['training']['requests_per_second']} req/s; "
      f"job at the end of the load: {sys.argv[2]})")
PY
