#!/usr/bin/env bash
# Per-request overhead: what HTTP, JSON, tokenization and queueing add to the encoder, on the shipped
# defaults, in one run on the same texts:
# - concurrency 1: HTTP P50 against the in-process encoder's time for one text alone (tokenization
#   included), and the server's own mean tokenization time (from /metrics);
# - concurrency 32: HTTP throughput against the in-process encoder's throughput on the same texts packed
#   32 at a time, and against PyTorch in-process (batch 32, texts sorted by length, 2 threads).
# The client's and the server's CPU time are reported, so a client that starves the server shows.
#
#   loadtest/bench-overhead.sh [seconds-per-point]      (default 10)
#   WORKLOADS="mixed" loadtest/bench-overhead.sh          (a subset of short, mixed, long)
#
# Workloads from real mail (SpamAssassin): short = 12-word sentences; mixed = 1–20 words, seeded, with one
# whole mail in 50; long = whole mails (truncated at 256 tokens). Needs the venv of loadtest/bench-embed.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

seconds="${1:-10}"
prepare
cargo bench --quiet --bench embed_texts --no-run 2>/dev/null
out=target/bench
mkdir -p "$out"
python3 - "$out" <<'PY'
import json, random, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open("datasets/spamassassin/easy-ham-1.jsonl")][:400]
rows += [json.loads(l) for l in open("datasets/spamassassin/spam-1.jsonl")][:100]
rng = random.Random(29)
rng.shuffle(rows)
def write(name, texts):
    with open(f"{out}/texts-{name}.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
words = [r["text"].split() for r in rows]
write("short", [" ".join(w[:12]) for w in words if len(w) >= 12])
mixed = []
for i, w in enumerate(words):
    if i % 50 == 49:
        mixed.append(rows[i]["text"])
    else:
        start = rng.randrange(max(1, len(w) - 20))
        mixed.append(" ".join(w[start:start + rng.randint(1, 20)]) or "hello")
write("mixed", mixed)
write("long", [r["text"] for r in rows])
PY

start_server "$out/server-overhead.log"
csv="$out/overhead.csv"
rm -f "$csv" "$out/overhead.jsonl"
tokenize_sum_count() {
  curl -sf "$url/metrics" | awk '/^flywheel_tokenize_duration_seconds_sum /{s=$2} /^flywheel_tokenize_duration_seconds_count /{c=$2} END{print s, c}'
}
server_cpu() { awk '{print ($14 + $15) / 100}' "/proc/$server/stat"; }

workloads="${WORKLOADS:-short mixed long}"
for workload in $workloads; do
  texts="$out/texts-$workload.jsonl"
  for c in 1 32; do
    read -r s0 n0 < <(tokenize_sum_count)
    cpu0=$(server_cpu)
    /usr/bin/time -f '%U %S' -o "$out/overhead-time.txt" target/release/flywheel-loadtest --url "$url" \
      --texts "$texts" --concurrency "$c" --duration "$seconds" --warmup 2 --label "http-$workload" \
      --csv "$csv" >"$out/overhead-last.json" 2>/dev/null
    client_cpu=$(tail -n 1 "$out/overhead-time.txt" | awk '{print $1 + $2}')
    cpu1=$(server_cpu)
    read -r s1 n1 < <(tokenize_sum_count)
    python3 - "$out/overhead-last.json" "$workload" "$c" "$client_cpu" "$cpu0" "$cpu1" "$s0" "$n0" "$s1" "$n1" >>"$out/overhead.jsonl" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
workload, c, client, cpu0, cpu1, s0, n0, s1, n1 = sys.argv[2:]
run.update(workload=workload, client_cpu_s=float(client), server_cpu_s=float(cpu1) - float(cpu0),
           tokenize_ms=(float(s1) - float(s0)) / max(1.0, float(n1) - float(n0)) * 1e3)
print(json.dumps(run))
PY
  done
  cargo bench --quiet --bench embed_texts -- --texts "$texts" --batches 1,32 --duration "$seconds" \
    | sed "s/^{/{\"workload\":\"$workload\",/" >>"$out/overhead.jsonl"
  .venv/bin/python benches/pytorch_embed.py --texts "$texts" --duration "$seconds" --batches 32 --length-sorted \
    | sed "s/^{/{\"workload\":\"$workload\",/" >>"$out/overhead.jsonl"
done

python3 - "$out/overhead.jsonl" "$seconds" "$workloads" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def get(workload, label, key, value):
    return next(r for r in runs if r.get("workload") == workload and r["label"].startswith(label) and r[key] == value)
print("| texts | HTTP c=1 P50 | in-process 1 text | overhead | tokenize (server) | HTTP c=32 texts/s | in-process ×32 texts/s | ratio | PyTorch ×32 sorted | ratio | 429s | CPU client / server |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for w in sys.argv[3].split():
    h1, h32 = get(w, "http", "concurrency", 1), get(w, "http", "concurrency", 32)
    i1, i32 = get(w, "flywheel-in-process", "batch", 1), get(w, "flywheel-in-process", "batch", 32)
    pt = get(w, "pytorch", "batch", 32)
    shed = int(h1.get("shed", 0)) + int(h32.get("shed", 0))
    print(f"| {w} | {h1['p50_ms']:.2f} ms | {i1['p50_ms']:.2f} ms | {h1['p50_ms'] - i1['p50_ms']:+.2f} ms | "
          f"{h1['tokenize_ms']:.3f} / {h32['tokenize_ms']:.3f} ms | {h32['texts_per_second']:.1f} | "
          f"{i32['texts_per_second']:.1f} | {h32['texts_per_second'] / i32['texts_per_second']:.2f}× | "
          f"{pt['texts_per_second']:.1f} | {h32['texts_per_second'] / pt['texts_per_second']:.2f}× | {shed} | "
          f"{h32['client_cpu_s']:.1f} / {h32['server_cpu_s']:.1f} s of {float(sys.argv[2]) + 2:.0f} s |")
PY
