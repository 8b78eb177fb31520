#!/usr/bin/env bash
# What drift monitoring costs serving: a task served by the PEFT fixture (its stable generation is watched),
# classified through `/v1/predict` by closed-loop clients (mail, the first 80 words, one client; short
# sentences, 32 clients) and by open-loop traffic at about half of what the server sustains (mail at 20
# requests/s, sentences at 150/s), on fresh servers with `[drift] enabled` off and on (the shipped default),
# twice each, alternating. With drift on, every answered input is queued for the base model's embedding,
# computed while the model thread is idle; each load reports how many inputs were embedded and how many
# dropped (queue full).
#
#   loadtest/bench-drift-cost.sh [seconds]      (default 15)
#
# Results in target/bench/drift-cost.csv and a table on stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-15}"
prepare
out=target/bench
mkdir -p "$out"
sentences "$out/texts-sentences.jsonl"
python3 - "$out/texts-mails.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for g in ("easy-ham-1", "spam-1") for l in open(f"datasets/spamassassin/{g}.jsonl")]
with open(sys.argv[1], "w") as f:
    for r in rows[::5]:
        f.write(json.dumps({"text": " ".join(r["text"].split()[:80])}) + "\n")
PY
csv="$out/drift-cost.csv"
rm -f "$csv"
counts="$out/drift-cost-inputs.txt"
rm -f "$counts"

inputs() { # "embedded dropped" so far
  local m
  m=$(curl -sf "$url/metrics")
  echo "$(grep -o 'outcome="embedded"} [0-9]*' <<<"$m" | grep -o '[0-9]*$' || echo 0)" \
    "$(grep -o 'outcome="dropped"} [0-9]*' <<<"$m" | grep -o '[0-9]*$' || echo 0)"
}

run() { # label enabled
  local label=$1
  export FLYWHEEL_DRIFT__ENABLED=$2
  start_server "$out/server-drift-$label.log"
  unset FLYWHEEL_DRIFT__ENABLED
  mkdir -p "$data/adapters"
  cp -r tests/fixtures/peft_seq_cls "$data/adapters/stable"
  curl -sf "$url/v1/tasks" -H 'content-type: application/json' \
    -d '{"name":"sentiment","labels":["negative","neutral","positive"]}' >/dev/null
  curl -sf "$url/v1/adapters" -H 'content-type: application/json' \
    -d '{"path":"stable","task":"sentiment"}' >/dev/null
  for load in "mails 1 0" "sentences 32 0" "mails 32 20" "sentences 32 150"; do
    set -- $load
    local before after
    before=$(inputs)
    target/release/flywheel-loadtest --url "$url" --texts "$out/texts-$1.jsonl" --task sentiment \
      --concurrency "$2" --rate "$3" --duration "$seconds" --warmup 2 --label "$label $1@$3" \
      --csv "$csv" >/dev/null 2>&1
    after=$(inputs)
    echo "$label $1@$3 $before $after" >>"$counts"
  done
  kill "$server" && wait "$server" || true
  rm -rf "$data"
  trap - EXIT
}

for round in 1 2; do
  run "off-$round" false
  run "on-$round" true
done

python3 - "$csv" "$counts" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
inputs = {}
for line in open(sys.argv[2]):
    run, load, e0, d0, e1, d1 = line.split()
    inputs[(run, load)] = (int(e1) - int(e0), int(d1) - int(d0))
print("| run | load | clients | requests/s | P50 ms | P99 ms | errors | inputs embedded / dropped |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    run, load = r["label"].split()
    texts, rate = load.split("@")
    kind = "closed loop" if rate == "0" else f"open loop, {rate}/s"
    e, d = inputs.get((run, load), (0, 0))
    shown = f"{e} / {d}" if run.startswith("on") else "—"
    print(f"| {run} | {texts}, {kind} | {r['concurrency']} | {float(r['requests_per_second']):.1f} | "
          f"{float(r['p50_ms']):.2f} | {float(r['p99_ms']):.2f} | {r['errors']} | {shown} |")
mean = lambda v: sum(v) / len(v)
for load in sorted({r["label"].split()[1] for r in rows}):
    pick = lambda state, key: [float(r[key]) for r in rows
                               if r["label"].split()[1] == load and r["label"].startswith(state)]
    print(f"{load}: throughput on/off {mean(pick('on', 'requests_per_second')) / mean(pick('off', 'requests_per_second')):.3f}x, "
          f"P50 on/off {mean(pick('on', 'p50_ms')) / mean(pick('off', 'p50_ms')):.3f}x, "
          f"P99 on/off {mean(pick('on', 'p99_ms')) / mean(pick('off', 'p99_ms')):.3f}x")
PY
