"""PyTorch in-process baseline for the embedding benchmark (loadtest/bench-embed.sh runs it).

Same texts, same semantics as Flywheel's /v1/embed: truncation at 256 tokens, mean pooling over the
attention mask, L2 normalisation. Tokenization is inside the timed region, as it is for the server.
Measures batch 1 (latency percentiles) and batch 32 (throughput, padded to the longest text in the batch,
as a plain transformers loop does; with --length-sorted the texts are ordered by length first, so a batch
pads little). 2 threads and flush-denormal, as the project's benchmarks require.

    .venv/bin/python benches/pytorch_embed.py --texts FILE --duration 10 [--csv out.csv]
"""
import argparse
import csv
import json
import os
import time

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


def read_texts(path):
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                text = obj.get("text", "") if isinstance(obj, dict) else line
            except json.JSONDecodeError:
                text = line
            if text.strip():
                texts.append(text)
    return texts


def run(model, tokenizer, texts, batch, duration, warmup):
    def step(i):
        chunk = [texts[(i + j) % len(texts)] for j in range(batch)]
        enc = tokenizer(chunk, truncation=True, max_length=256, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            torch.nn.functional.normalize(pooled, p=2, dim=1)

    i = 0
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        step(i)
        i += batch
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        t = time.perf_counter()
        step(i)
        latencies.append((time.perf_counter() - t) * 1e3)
        i += batch
    seconds = time.perf_counter() - start
    lat = np.array(latencies)
    return {
        "label": "pytorch-in-process",
        "concurrency": 1,
        "batch": batch,
        "seconds": round(seconds, 2),
        "requests": len(latencies),
        "errors": 0,
        "texts_per_second": len(latencies) * batch / seconds,
        "requests_per_second": len(latencies) / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", required=True)
    parser.add_argument("--model", default="models/all-MiniLM-L6-v2")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--csv")
    parser.add_argument("--length-sorted", action="store_true",
                        help="order the texts by token count first, so each batch pads little (PyTorch's best case)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    texts = read_texts(args.texts)
    if args.length_sorted:
        lengths = {t: len(tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts}
        texts.sort(key=lambda t: lengths[t])
    for batch in [int(b) for b in args.batches.split(",")]:
        summary = run(model, tokenizer, texts, batch, args.duration, args.warmup)
        summary["torch"] = torch.__version__
        summary["length_sorted"] = args.length_sorted
        print(json.dumps(summary))
        if args.csv:
            new = not os.path.exists(args.csv)
            with open(args.csv, "a", newline="") as f:
                fields = ["label", "concurrency", "batch", "seconds", "requests", "errors", "texts_per_second",
                          "requests_per_second", "p50_ms", "p95_ms", "p99_ms", "max_ms"]
                writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(summary)


if __name__ == "__main__":
    main()
