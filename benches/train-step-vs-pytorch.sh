#!/usr/bin/env bash
# One training step side by side: Flywheel (`cargo bench --bench train_step`) and PEFT / PyTorch
# (benches/pytorch_train_step.py) on the same shapes, alternating, for each sequence length given; prints a
# table with the speed ratios (PyTorch's time / Flywheel's: above 1 means Flywheel is faster).
#
#   [RUNS=N] benches/train-step-vs-pytorch.sh [L ...]      (default: 64 48 64; batch 16; RUNS 1)
#
# With RUNS=N the whole list runs N times, and the table ends with each length's medians: single runs of
# either side vary by 20 % or more on a shared machine.
#
# Needs models/fetch.sh and torch + transformers + peft in .venv
# (python3 -m venv .venv && .venv/bin/pip install torch transformers peft). Results in target/bench/train-step.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lengths=("$@")
[ ${#lengths[@]} -gt 0 ] || lengths=(64 48 64)
runs=${RUNS:-1}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "RUNS must be a whole number ≥ 1, not '$runs'" >&2; exit 1; }
models/fetch.sh >/dev/null
[ -x .venv/bin/python ] || { echo "needs .venv with torch, transformers and peft (see the header)" >&2; exit 1; }
bench=$(cargo bench --bench train_step --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "train_step" and m.get("executable"):
        print(m["executable"])')
out=target/bench
mkdir -p "$out"
raw=$(mktemp)
trap 'rm -f "$raw"' EXIT
{
  echo "| run | 16 × L | Flywheel LoRA | PEFT LoRA | ratio | Flywheel full | PyTorch full | ratio |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  for run in $(seq 1 "$runs"); do
    for len in "${lengths[@]}"; do
      ours=$("$bench" "$len" 2>/dev/null)
      theirs=$(.venv/bin/python benches/pytorch_train_step.py "$len" 2>/dev/null)
      python3 - "$run" "$len" "$ours" "$theirs" "$raw" <<'PY'
import re, sys
run, length, ours, theirs, raw = sys.argv[1:6]
def ms(text, pattern):
    return float(re.search(pattern + r".*?median (\d+(?:\.\d+)?) ms", text).group(1))
fl, ff = ms(ours, r"flywheel LoRA step"), ms(ours, r"flywheel full fine-tuning step")
pl, pf = ms(theirs, r"peft LoRA step"), ms(theirs, r"pytorch full fine-tuning step")
with open(raw, "a") as f:
    f.write(f"{length} {fl} {pl} {ff} {pf}\n")
print(f"| {run} | L = {length} | {fl:,.0f} ms | {pl:,.0f} ms | {pl / fl:.2f}× | {ff:,.0f} ms | {pf:,.0f} ms | {pf / ff:.2f}× |")
PY
    done
  done
  # Per length, the median of each column and the ratios of those medians: on a shared machine single runs
  # of either side move by 20 % or more.
  python3 - "$raw" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    length, *values = line.split()
    rows.setdefault(length, []).append([float(v) for v in values])
for length, values in rows.items():
    fl, pl, ff, pf = (statistics.median(column) for column in zip(*values))
    print(f"| median of {len(values)} | L = {length} | {fl:,.0f} ms | {pl:,.0f} ms | {pl / fl:.2f}× | {ff:,.0f} ms | {pf:,.0f} ms | {pf / ff:.2f}× |")
PY
} | tee "$out/train-step.md"
