#!/usr/bin/env bash
# Bulk requests beside short ones, on the shipped defaults: 2 closed-loop clients each embedding 256 passages of
# 50 words per request (two batches each, as an ingestion job or LangChain's embed_documents sends them) while
# 4 closed-loop clients embed one 12-word sentence each. Counts each group's 429s, throughput and latency.
#
#   loadtest/bench-bulk.sh [seconds] [binary...]      (default 20 s; the release build)
#
# Several binaries run one after another in the same call, for a side-by-side comparison on one machine.
# Needs models/fetch.sh and datasets/fetch-spamassassin.sh (prepare runs them). Results in
# target/bench/bulk.csv and a table on stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-20}"
shift || true
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(target/release/flywheel)
prepare
out=target/bench
mkdir -p "$out"
sentences "$out/texts-sentences.jsonl"
python3 - "$out/texts-passages.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("datasets/spamassassin/easy-ham-2.jsonl")]
with open(sys.argv[1], "w") as f:
    for r in rows:
        words = r["text"].split()
        if len(words) >= 50:
            f.write(json.dumps({"text": " ".join(words[:50])}) + "\n")
PY
csv="$out/bulk.csv"
rm -f "$csv"
for bin in "${bins[@]}"; do
  FLYWHEEL_BIN="$bin" start_server "$out/server-bulk.log"
  name=$(basename "$bin")
  target/release/flywheel-loadtest --url "$url" --texts "$out/texts-passages.jsonl" --concurrency 2 --batch 256 \
    --duration "$seconds" --warmup 2 --label "$name bulk" --csv "$csv" >/dev/null 2>&1 &
  bulk=$!
  target/release/flywheel-loadtest --url "$url" --texts "$out/texts-sentences.jsonl" --concurrency 4 \
    --duration "$seconds" --warmup 2 --label "$name short" --csv "$csv" >/dev/null 2>&1
  wait "$bulk"
  kill "$server" && wait "$server" || true
  trap - EXIT
  rm -rf "$data"
done
python3 - "$csv" <<'PY'
import csv, sys
print("| build, clients | requests answered | 429 | texts/s | P50 | P99 | max |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in csv.DictReader(open(sys.argv[1])):
    print(f"| {r['label']} ({r['concurrency']} × {r['batch']} texts) | {r['requests']} | {r['shed']} | "
          f"{float(r['texts_per_second']):.1f} | {float(r['p50_ms']):.0f} ms | {float(r['p99_ms']):.0f} ms | "
          f"{float(r['max_ms']):.0f} ms |")
PY
