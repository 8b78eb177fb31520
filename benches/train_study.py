#!/usr/bin/env python3
"""Runs training recipes over seeds on a data set, with Flywheel (`flywheel train`) or PEFT
(`benches/peft_classify.py`), appends one JSON line per run to a results file, and prints the table of
means over seeds.

Usage:
  train_study.py run --data sotu|spam --engine flywheel|peft --seeds 0,1,2 --results R.jsonl \
      [--bin target/debug/flywheel] [--threads 2] NAME='{"rank": 16}' ...
  train_study.py table R.jsonl ...

A recipe is a name and a JSON object of Flywheel `TrainConfig` overrides (`{}`: the defaults); the seed is
added per run. A run already in the results file (same data, engine, recipe name and seed) is skipped, so an
interrupted study resumes. Data sets:
  sotu  datasets/sotu/{train,test}.jsonl (datasets/fetch-sotu.sh): six eras, 1,008 train and 252 test rows;
  spam  SpamAssassin (datasets/fetch-spamassassin.sh) as benches/lora-vs-full.sh cuts it: the first 300 spam-1
        and 600 easy-ham-1 mails to train, the next 200 and 400 to test."""

import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.environ.get("FLYWHEEL_MODEL__DIR", os.path.join(ROOT, "models/all-MiniLM-L6-v2"))


def jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def dataset(name, work):
    """(train path, test path, labels) of a data set."""
    if name == "sotu":
        train = os.path.join(ROOT, "datasets/sotu/train.jsonl")
        test = os.path.join(ROOT, "datasets/sotu/test.jsonl")
        return train, test, sorted({r["label"] for r in jsonl(train)})
    if name == "spam":
        spam = jsonl(os.path.join(ROOT, "datasets/spamassassin/spam-1.jsonl"))
        ham = jsonl(os.path.join(ROOT, "datasets/spamassassin/easy-ham-1.jsonl"))
        paths = []
        for part, rows in (("train", spam[:300] + ham[:600]), ("test", spam[300:500] + ham[600:1000])):
            path = os.path.join(work, f"spam-{part}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
            paths.append(path)
        return paths[0], paths[1], ["ham", "spam"]
    sys.exit(f"unknown data set {name!r}")


def flywheel(binary, threads, train, test, labels, params, work):
    out = tempfile.mkdtemp(dir=work)
    os.rmdir(out)
    method = params.pop("method", "lora")
    cmd = [binary, "train", "--task", "study", "--method", method, "--data", train, "--test", test,
           "--labels", ",".join(labels), "--params", json.dumps(params), "--threads", str(threads),
           "--model", MODEL, "--out", out]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"macro_f1": report["test"]["macro_f1"], "accuracy": report["test"]["accuracy"],
            "val_macro_f1": (report["val"] or {}).get("macro_f1"), "wall_seconds": report["wall_seconds"],
            "trainable_params": report["trainable_params"], "best_epoch": report["best_epoch"],
            "val_history": [round(h["val"]["macro_f1"], 4) for h in report.get("history", []) if h.get("val")]}


def peft(train, test, labels, params, work):
    out = os.path.join(work, "peft.json")
    python = os.path.join(ROOT, ".venv/bin/python")
    subprocess.run([python, os.path.join(ROOT, "benches/peft_classify.py"), "--params", json.dumps(params),
                    MODEL, train, test, ",".join(labels), out], check=True, capture_output=True, text=True)
    report = json.load(open(out))
    return {"macro_f1": report["test"]["macro_f1"], "accuracy": report["test"]["accuracy"],
            "val_macro_f1": report["val_macro_f1"], "wall_seconds": report["wall_seconds"],
            "trainable_params": report["trainable_params"], "best_epoch": report["best_epoch"],
            "val_history": report.get("val_history", [])}


def run(args):
    opts, recipes = {}, []
    i = 0
    while i < len(args):
        if args[i].startswith("--"):
            opts[args[i][2:]] = args[i + 1]
            i += 2
        else:
            name, _, params = args[i].partition("=")
            recipes.append((name, json.loads(params or "{}")))
            i += 1
    data, engine, results = opts["data"], opts["engine"], opts["results"]
    seeds = [int(s) for s in opts.get("seeds", "0,1,2").split(",")]
    binary = opts.get("bin", os.path.join(ROOT, "target/debug/flywheel"))
    threads = int(opts.get("threads", "2"))
    done = {(r["data"], r["engine"], r["recipe"], r["seed"]) for r in jsonl(results)} \
        if os.path.exists(results) else set()
    with tempfile.TemporaryDirectory() as work:
        train, test, labels = dataset(data, work)
        for name, params in recipes:
            for seed in seeds:
                if (data, engine, name, seed) in done:
                    continue
                p = {**params, "seed": seed}
                if engine == "flywheel":
                    scores = flywheel(binary, threads, train, test, labels, dict(p), work)
                else:
                    scores = peft(train, test, labels, p, work)
                row = {"data": data, "engine": engine, "recipe": name, "params": params, "seed": seed, **scores}
                with open(results, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


def table(paths):
    rows = [r for p in paths for r in jsonl(p)]
    groups = {}
    for r in rows:
        groups.setdefault((r["data"], r["recipe"], r["engine"]), []).append(r)
    print("| data | recipe | engine | seeds | test macro-F1 (mean ± sd) | accuracy | best epoch | trainable | "
          "wall time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (data, recipe, engine), g in groups.items():
        f1 = [r["macro_f1"] for r in g]
        sd = statistics.stdev(f1) if len(f1) > 1 else 0.0
        acc = statistics.mean(r["accuracy"] for r in g)
        epochs = "/".join(str(r["best_epoch"]) for r in g)
        wall = statistics.mean(r["wall_seconds"] for r in g)
        print(f"| {data} | {recipe} | {engine} | {len(g)} | {statistics.mean(f1):.3f} ± {sd:.3f} | {acc:.3f} "
              f"| {epochs} | {g[0]['trainable_params']:,} | {wall:.0f} s |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        run(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "table":
        table(sys.argv[2:])
    else:
        sys.exit(__doc__)
