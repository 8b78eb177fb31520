#!/usr/bin/env bash
# LoRA against full fine-tuning, Flywheel and PEFT side by side, on both data sets, over seeds: the many-class
# State of the Union eras (datasets/fetch-sotu.sh) and SpamAssassin (datasets/fetch-spamassassin.sh, 300 spam
# + 600 ham to train, 200 + 400 to test, cut at 64 tokens); every other hyperparameter at its default, so each
# method trains its own default epochs at its own default learning rate.
# Four runs per seed and data set: Flywheel's LoRA defaults and full fine-tuning (`flywheel train`), and PEFT
# with the same two recipes (benches/peft_classify.py: PyTorch on 2 threads). Prints macro-F1 and accuracy
# (means ± sd over seeds), wall time and trainable parameters, then the ratios the claim is about.
# Usage: benches/lora-vs-full.sh [SEEDS] [BINARY]   (SEEDS: comma-separated, default 0,1,2; needs models/fetch.sh,
# both data scripts, and torch, transformers and peft in .venv for the PEFT rows)
# Rows already in target/lora-vs-full.jsonl are kept (an interrupted run resumes); delete it to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-0,1,2}"
bin="${2:-}"
if [ -z "$bin" ]; then
  cargo build --release --bin flywheel
  bin=target/release/flywheel
fi
results=target/lora-vs-full.jsonl
study() { python3 benches/train_study.py run --results "$results" --seeds "$seeds" --bin "$bin" "$@"; }
engines=(flywheel)
if .venv/bin/python -c 'import torch, transformers, peft' 2>/dev/null; then
  engines+=(peft)
else
  echo "no torch, transformers and peft in .venv: Flywheel rows only" >&2
fi
for engine in "${engines[@]}"; do
  study --data sotu --engine "$engine" 'lora={}' 'full={"method": "full"}'
  study --data spam --engine "$engine" 'lora={"max_length": 64}' 'full={"method": "full", "max_length": 64}'
done
python3 benches/train_study.py table "$results"
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def mean(data, engine, recipe, key):
    xs = [r[key] for r in rows if (r["data"], r["engine"], r["recipe"]) == (data, engine, recipe)]
    return statistics.mean(xs) if xs else None
for data in ("sotu", "spam"):
    lora = mean(data, "flywheel", "lora", "macro_f1")
    for engine in ("flywheel", "peft"):
        full = mean(data, engine, "full", "macro_f1")
        if lora and full:
            print(f"{data}: Flywheel LoRA reaches {100 * lora / full:.1f} % of {engine} full fine-tuning's macro-F1")
    peft_lora = mean(data, "peft", "lora", "macro_f1")
    if lora and peft_lora:
        print(f"{data}: Flywheel LoRA {lora:.3f} against PEFT LoRA {peft_lora:.3f} with the same recipe")
    t_lora, t_full = mean(data, "flywheel", "lora", "wall_seconds"), mean(data, "flywheel", "full", "wall_seconds")
    if t_lora and t_full:
        print(f"{data}: Flywheel LoRA trains in {t_lora / t_full:.2f}× the wall time of Flywheel full fine-tuning")
PY
