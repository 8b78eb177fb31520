#!/usr/bin/env bash
# LoRA against full fine-tuning on real mail (SpamAssassin spam-1 vs easy-ham-1), same data, same epochs,
# same thread count: macro-F1 on a held-out test set, trainable parameters and wall time of each.
# Usage: benches/lora-vs-full.sh [THREADS] [BINARY]   (needs models/fetch.sh and datasets/fetch-spamassassin.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-1}"
bin="${2:-target/release/flywheel}"
[ -x "$bin" ] || cargo build --release --bin flywheel
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Train/validation pool: the first 300 spam and 600 ham; test: the next 200 spam and 400 ham.
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
def rows(group):
    return [json.loads(l) for l in open(f"datasets/spamassassin/{group}.jsonl")]
spam, ham = rows("spam-1"), rows("easy-ham-1")
def dump(name, items):
    with open(f"{work}/{name}.jsonl", "w") as f:
        for r in items:
            f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
dump("train", spam[:300] + ham[:600])
dump("test", spam[300:500] + ham[600:1000])
PY
params='{"epochs": 4, "max_length": 64, "seed": 7}'
for method in lora full; do
    "$bin" train --task spam --method "$method" --data "$work/train.jsonl" --test "$work/test.jsonl" \
        --labels ham,spam --params "$params" --threads "$threads" --out "$work/$method" \
        > "$work/$method.json"
done
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
r = {m: json.load(open(f"{work}/{m}.json")) for m in ("lora", "full")}
print("| method | test macro-F1 | test accuracy | test AUC | trainable params | share of base | wall time |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for m in ("lora", "full"):
    x = r[m]
    t = x["test"]
    print(f"| {m} | {t['macro_f1']:.4f} | {t['accuracy']:.4f} | {t['auc']:.4f} | {x['trainable_params']:,} "
          f"| {100 * x['trainable_params'] / x['base_params']:.2f} % | {x['wall_seconds']:.0f} s |")
ratio = r["lora"]["test"]["macro_f1"] / r["full"]["test"]["macro_f1"]
speed = r["full"]["wall_seconds"] / r["lora"]["wall_seconds"]
print(f"\nLoRA reaches {100 * ratio:.1f} % of full fine-tuning's macro-F1 in 1/{speed:.2f} of its time.")
json.dump(r, open("target/lora-vs-full.json", "w"), indent=2)
PY
