#!/usr/bin/env bash
# Embedding benchmark, Flywheel over HTTP vs PyTorch in-process, in one run on the same texts.
#
#   loadtest/bench-embed.sh [seconds-per-point]      (default 10)
#
# Needs the model (models/fetch.sh), the SpamAssassin data (datasets/fetch-spamassassin.sh) and a venv
# with torch + transformers in .venv (python3 -m venv .venv && .venv/bin/pip install torch transformers).
# Writes target/bench/embed-<workload>.csv and prints one JSON line per measured point.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-10}"
prepare
out=target/bench
mkdir -p "$out"

# Two workloads from real mail: short texts (the first 24 words: ~20-45 tokens) and whole mails
# (subject + body, truncated by the tokenizer at 256 tokens).
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open("datasets/spamassassin/easy-ham-1.jsonl")][:400]
rows += [json.loads(l) for l in open("datasets/spamassassin/spam-1.jsonl")][:100]
with open(f"{out}/texts-short.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps({"text": " ".join(r["text"].split()[:24])}) + "\n")
with open(f"{out}/texts-mail.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps({"text": r["text"]}) + "\n")
PY

# The shipped defaults, admission included: on whole mails 32 clients queue more than the 250 ms budget of
# work, so part of them is shed (the `shed` column) while the model stays busy; throughput counts answers.
start_server "$out/server.log"

for workload in short mail; do
  csv="$out/embed-$workload.csv"
  rm -f "$csv"
  for c in 1 32; do
    target/release/flywheel-loadtest --url "$url" --texts "$out/texts-$workload.jsonl" --concurrency "$c" \
      --duration "$seconds" --warmup 2 --label "flywheel-http-$workload" --csv "$csv"
  done
  .venv/bin/python benches/pytorch_embed.py --texts "$out/texts-$workload.jsonl" --duration "$seconds" --csv "$csv"
done
echo "results: $out/embed-short.csv $out/embed-mail.csv"
