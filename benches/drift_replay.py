"""Replays the drift power measurement of docs/DRIFT.md in numpy, redrawing the reference for every window.

The base model's mean-pooled, L2-normalised embeddings of every SpamAssassin mail (its first 80 words) are
computed with PyTorch once (cached in target/bench/drift-embeddings.npz); then, for each of 20 windows, a
reference of `ref` mails (half easy-ham-1, half spam-1) and a window of `win` mails (other mails of the same
groups, or of the later corpus easy-ham-2 + spam-2) are drawn at random, and three permutation tests
(999 permutations) count a detection at p <= 0.001: the cosine distance between the means, and the
Mahalanobis distance between the means under the pooled covariance shrunk by 1x and 3x its average
variance (Flywheel uses 1x).

    .venv/bin/python benches/drift_replay.py      (needs models/fetch.sh and datasets/fetch-spamassassin.sh)
"""
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "target/bench/drift-embeddings.npz")
GROUPS = ["easy-ham-1", "spam-1", "easy-ham-2", "spam-2"]
PERMUTATIONS = 999


def embeddings():
    if os.path.exists(CACHE):
        data = np.load(CACHE)
        return {g: data[g.replace("-", "_")] for g in GROUPS}
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    model_dir = os.path.join(ROOT, "models/all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = {}
    for group in GROUPS:
        path = os.path.join(ROOT, f"datasets/spamassassin/{group}.jsonl")
        texts = [" ".join(json.loads(line)["text"].split()[:80]) for line in open(path)]
        rows = []
        for i in range(0, len(texts), 32):
            batch = tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        out[group] = np.concatenate(rows)
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    np.savez(CACHE, **{g.replace("-", "_"): v for g, v in out.items()})
    return out


def p_cosine(x, y, rng):
    def stat(a, b):
        ma, mb = a.mean(0), b.mean(0)
        return 1 - ma @ mb / np.linalg.norm(ma) / np.linalg.norm(mb)

    z, n, t = np.vstack([x, y]), len(x), stat(x, y)
    hits = sum(stat(*np.split(z[rng.permutation(len(z))], [n])) >= t for _ in range(PERMUTATIONS))
    return (hits + 1) / (PERMUTATIONS + 1)


def p_mahalanobis(x, y, rng, shrinkage):
    z = np.vstack([x, y])
    zc = z - z.mean(0)
    cov = zc.T @ zc / len(z)
    cov += shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    values, vectors = np.linalg.eigh(cov)
    white = zc @ (vectors / np.sqrt(values))
    n = len(x)

    def stat(rows):
        return np.sum((rows[:n].mean(0) - rows[n:].mean(0)) ** 2)

    t = stat(white)
    hits = sum(stat(white[rng.permutation(len(z))]) >= t for _ in range(PERMUTATIONS))
    return (hits + 1) / (PERMUTATIONS + 1)


def main():
    e = embeddings()
    ham, spam = e["easy-ham-1"], e["spam-1"]
    print("| reference | window | false alarms: cosine / Mahalanobis 1x / 3x | detected: cosine / Mahalanobis 1x / 3x |")
    print("| --- | --- | --- | --- |")
    for ref, win in [(200, 100), (200, 200), (500, 200)]:
        counts = {}
        for name, (wham, wspam) in {"same": (ham, spam), "later": (e["easy-ham-2"], e["spam-2"])}.items():
            hits = np.zeros(3, dtype=int)
            for w in range(20):
                rng = np.random.default_rng(100 + w)
                ih, isp = rng.permutation(len(ham)), rng.permutation(len(spam))
                reference = np.vstack([ham[ih[:ref // 2]], spam[isp[:ref // 2]]])
                if name == "same":
                    window = np.vstack([ham[ih[ref // 2:ref // 2 + win // 2]],
                                        spam[isp[ref // 2:ref // 2 + win // 2]]])
                else:
                    window = np.vstack([wham[rng.permutation(len(wham))[:win // 2]],
                                        wspam[rng.permutation(len(wspam))[:win // 2]]])
                p = [p_cosine(reference, window, rng), p_mahalanobis(reference, window, rng, 1.0),
                     p_mahalanobis(reference, window, rng, 3.0)]
                hits += np.array(p) <= 0.001
            counts[name] = " / ".join(str(h) for h in hits)
        print(f"| {ref} | {win} | {counts['same']} | {counts['later']} |", flush=True)


if __name__ == "__main__":
    main()
