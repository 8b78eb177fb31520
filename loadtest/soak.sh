#!/usr/bin/env bash
# Soak: MINUTES of mixed traffic on one server — a steady open-loop /v1/predict stream of real mail with half of
# the true labels posted as feedback 5 s later, so the server's own policies (loadtest/scenario.toml: train
# every 150 corrections, canary at 50 %, promote or roll back) keep training, canarying and promoting the
# whole time. Samples the server's RSS every 10 s and reports RSS after warm-up vs at the end, the 5xx count
# from the server's own counters (/ready's 503s while the model loads excepted), and the jobs and rollout
# decisions it made.
#
#   loadtest/soak.sh [minutes] [requests-per-second]      (defaults 20 and 6)
#
# Needs models/fetch.sh and datasets/fetch-spamassassin.sh (run by prepare). Results in target/soak/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

minutes="${1:-20}"
rate="${2:-6}"
prepare
out=target/soak
rm -rf "$out"
mkdir -p "$out"
start_server "$out/server.log" --config loadtest/scenario.toml
python3 - "$out" "$url" <<'PY'
import json, random, sys, time, urllib.request
out, url = sys.argv[1], sys.argv[2]
def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
rows = lambda g: [json.loads(l) for l in open(f"datasets/spamassassin/{g}.jsonl")]
rng = random.Random(11)
ham1, spam1, ham2, spam2 = (rows(g) for g in ("easy-ham-1", "spam-1", "easy-ham-2", "spam-2"))
for group in (ham1, spam1, ham2, spam2):
    rng.shuffle(group)
call("/v1/tasks", {"name": "spam", "labels": ["ham", "spam"]})
call("/v1/feedback", {"items": [{"task": "spam", "text": r["text"], "label": r["label"]} for r in ham1[:150] + spam1[:150]]})
job = call("/v1/train", {"task": "spam", "epochs": 3, "max_length": 64})["job_id"]
while call(f"/v1/jobs/{job}")["state"] in ("queued", "running"):
    time.sleep(1)
# The stream: the rest of all four groups, shuffled together.
stream = ham1[150:] + spam1[150:] + ham2 + spam2
rng.shuffle(stream)
with open(f"{out}/texts.jsonl", "w") as f:
    for r in stream:
        f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
PY
(
  while kill -0 "$server" 2>/dev/null; do
    echo "$(date +%s) $(awk '/VmRSS/{print $2}' "/proc/$server/status")" >>"$out/rss.txt"
    sleep 10
  done
) &
target/release/flywheel-loadtest --url "$url" --texts "$out/texts.jsonl" --rate "$rate" --concurrency 32 \
  --duration "$((minutes * 60))" --warmup 0 --timeout 60 --task spam --feedback 0.5 --feedback-delay 5 \
  --label soak --csv "$out/soak.csv" >/dev/null
curl -sf "$url/metrics" >"$out/metrics.txt"
curl -sf "$url/v1/jobs?task=spam" >"$out/jobs.json"
curl -sf "$url/v1/rollouts/spam" >"$out/rollout.json" || true
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import csv, json, re, sys
out = sys.argv[1]
rss = [tuple(map(int, l.split())) for l in open(f"{out}/rss.txt") if len(l.split()) == 2]
start = rss[0][0]
# After warm-up: the first sample two minutes into the stream (the first jobs and canaries have run).
warm = next((kb for t, kb in rss if t - start >= 120), rss[-1][1])
end = rss[-1][1]
fives = sum(float(v) for labels, v in re.findall(r'flywheel_requests_total\{([^}]*)\} (\S+)', open(f"{out}/metrics.txt").read())
            if re.search(r'status="5\d\d"', labels) and 'route="/ready"' not in labels)
load = next(csv.DictReader(open(f"{out}/soak.csv")))
jobs = json.load(open(f"{out}/jobs.json"))
states = {}
for j in jobs:
    states[j["state"]] = states.get(j["state"], 0) + 1
print(f"RSS after warm-up {warm / 1024:.0f} MiB, at the end {end / 1024:.0f} MiB ({(end - warm) / warm * 100:+.1f} %), "
      f"peak {max(kb for _, kb in rss) / 1024:.0f} MiB")
print(f"server 5xx: {fives:.0f}; load generator: {load['requests']} requests, {load['errors']} errors, "
      f"P50 {load['p50_ms']} ms, P99 {load['p99_ms']} ms; feedback {load['feedback_accepted']} accepted, "
      f"{load['feedback_failed']} failed")
events = {m[0]: float(m[1]) for m in re.findall(r'flywheel_rollout_events_total\{decision="(\w+)"[^}]*\} (\S+)', open(f"{out}/metrics.txt").read())}
print(f"training jobs by state: {states}; rollout decisions: {events}")
PY
