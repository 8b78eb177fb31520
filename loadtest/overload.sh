#!/usr/bin/env bash
# Overload: finds the closed-loop capacity C of /v1/embed on 60-word real mails (16 clients, on a server with
# the shipped defaults: 16 such requests are one batch, well inside the budget), takes S = 0.75 C as the sustainable rate, then,
# on a fresh server with the given flags (defaults otherwise), offers S, 4 S for a minute and S again (open
# loop, each latency counted from when the request was due). Reports P99 at S, the admitted requests' P99 at 4 S and their
# ratio, the share shed with 429, goodput, 5xx, and the server's RSS before, at peak and after.
#
#   loadtest/overload.sh [seconds at 4 S, default 60] [extra serve flags...]
#
# Needs models/fetch.sh and datasets/fetch-spamassassin.sh (prepare runs them). Results in target/bench/overload.csv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-60}"
shift || true
prepare
out=target/bench
mkdir -p "$out"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open("datasets/spamassassin/easy-ham-1.jsonl")]
with open(f"{out}/texts-overload.jsonl", "w") as f:
    for r in rows[1000:1400]:
        f.write(json.dumps({"text": " ".join(r["text"].split()[:60])}) + "\n")
PY
csv="$out/overload.csv"
rm -f "$csv" "$out/overload-rss.txt"
run() { # label rate duration [concurrency]
  target/release/flywheel-loadtest --url "$url" --texts "$out/texts-overload.jsonl" --rate "$2" \
    --concurrency "${4:-256}" --duration "$3" --warmup 3 --label "$1" --csv "$csv" 2>/dev/null
}
start_server "$out/server-capacity.log"
capacity=$(run capacity 0 20 16 | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests_per_second"])')
kill "$server" && wait "$server" || true
rm -rf "$data"
start_server "$out/server-overload.log" "$@"
( while kill -0 "$server" 2>/dev/null; do
    echo "$(date +%s) $(awk '/VmRSS/{print $2}' "/proc/$server/status" 2>/dev/null)" >>"$out/overload-rss.txt"
    sleep 1
  done ) &
sampler=$!
sustainable=$(python3 -c "print(round($capacity * 0.75, 1))")
overload=$(python3 -c "print(round($sustainable * 4, 1))")
echo "closed-loop capacity $capacity req/s; sustainable S = $sustainable req/s; overload 4 S = $overload req/s"
run sustainable "$sustainable" 30 >/dev/null
run overload "$overload" "$seconds" >/dev/null
run recovered "$sustainable" 30 >/dev/null
curl -sf "$url/metrics" >"$out/overload-metrics.txt"
kill "$sampler" 2>/dev/null || true
python3 - "$out" <<'PY'
import csv, re, sys
out = sys.argv[1]
runs = {r["label"]: r for r in csv.DictReader(open(f"{out}/overload.csv"))}
s, o, r = runs["sustainable"], runs["overload"], runs["recovered"]
for row in (s, o, r):
    print(f'{row["label"]:>11}: offered {float(row["rate"]):6.1f}/s, {row["requests"]:>5} requests, '
          f'{row["shed"]:>5} shed (429), {row["errors"]} errors, goodput {float(row["requests_per_second"]):5.1f}/s, '
          f'P50 {float(row["p50_ms"]):7.1f} ms, P99 {float(row["p99_ms"]):7.1f} ms, max {float(row["max_ms"]):7.1f} ms')
ratio = float(o["p99_ms"]) / float(s["p99_ms"])
print(f"admitted P99 at 4 S / P99 at S = {ratio:.2f}; shed {int(o['shed']) / int(o['requests']) * 100:.1f} % at 4 S")
metrics = open(f"{out}/overload-metrics.txt").read()
fives = sum(float(v) for labels, v in re.findall(r'flywheel_requests_total\{([^}]*)\} (\S+)', metrics)
            if re.search(r'status="5', labels) and 'route="/ready"' not in labels)
rejected = dict(re.findall(r'flywheel_requests_rejected_total\{reason="(\w+)"\} (\S+)', metrics))
print(f"5xx answered: {fives:.0f}; rejected by reason: {rejected}")
rss = [int(l.split()[1]) for l in open(f"{out}/overload-rss.txt") if len(l.split()) == 2]
print(f"RSS: before {rss[0] / 1024:.0f} MiB, peak {max(rss) / 1024:.0f} MiB, end {rss[-1] / 1024:.0f} MiB")
PY
