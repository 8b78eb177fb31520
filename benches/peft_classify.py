#!/usr/bin/env python3
"""PEFT LoRA (or plain full fine-tuning) on a labelled JSONL split with Flywheel's recipe, for side-by-side
figures.

The recipe mirrors Flywheel's `/v1/train` defaults: LoRA r=8, alpha 16, dropout 0.1 on query and value, a
classifier on the token mean trained in full; AdamW lr 4e-3, weight decay 0.01, gradients clipped to a global
norm of 1, linear warm-up over 10 % then linear decay; label smoothing 0.1; batch 16; max length 128; 3 epochs
with a stratified 15 % validation split, keeping the best epoch by validation macro-F1 (patience 3).
transformers keeps its dropout (0.1 on hidden states and attention) while training; Flywheel's trainer drops
only LoRA's inputs. PyTorch runs on 2 threads with denormals flushed.

`--params JSON` overrides the recipe with Flywheel's `TrainConfig` names: method (`lora` or `full`: every weight
of BertForSequenceClassification trains, lr 5e-5 and 5 epochs unless set), rank, alpha, targets (Flywheel's names: query, key,
value, attention_output, intermediate, output), lora_dropout, learning_rate, head_learning_rate, epochs,
batch_size, warmup_ratio, weight_decay, max_grad_norm, label_smoothing, max_length, patience, val_fraction,
seed, pooling (`mean`: LoRA on the bare BertModel and a classifier on the token mean, padding excluded, as Flywheel's mean
head; without SAVE_DIR, as such a model is not a PEFT sequence classifier) and train_pooler (the pooler joins
`modules_to_save`). A key this script cannot express is refused.

With SAVE_DIR, the trained adapter is saved there (`save_pretrained`) and OUT.json also holds the test
probabilities at the server's truncation (256 tokens), so a server can load the adapter and be compared with
PyTorch.

Usage: peft_classify.py [--params JSON] MODEL_DIR TRAIN.jsonl TEST.jsonl LABEL,LABEL,... OUT.json [SAVE_DIR]"""

import argparse
import json
import random
import sys
import time
from types import SimpleNamespace

import torch
from classify_metrics import auc, macro_f1
from safetensors import safe_open
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

DEFAULTS = {
    "method": "lora", "rank": 8, "alpha": 16.0, "targets": ["query", "value"], "lora_dropout": 0.1,
    "learning_rate": None, "head_learning_rate": None, "epochs": None, "batch_size": 16, "warmup_ratio": 0.1,
    "weight_decay": 0.01, "max_grad_norm": 1.0, "label_smoothing": 0.1, "max_length": 128, "patience": 3,
    "val_fraction": 0.15, "seed": 0, "pooling": None, "train_pooler": False,
}
MODULES = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attention_output": "attention.output.dense", "intermediate": "intermediate.dense", "output": "output.dense",
}
# The server cuts inputs at `model.max_length` (256), not at the job's 128: the probabilities compared with a
# server are computed at its length, or long reviews differ by truncation alone.
SERVE_MAX_LEN = 256


def rows(path, labels):
    out = []
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        out.append((r["text"], labels.index(r["label"])))
    return out


def split(data, share, seed):
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted({y for _, y in data}):
        items = [d for d in data if d[1] == label]
        rng.shuffle(items)
        cut = max(1, round(len(items) * share))
        val += items[:cut]
        train += items[cut:]
    return train, val


def scores(model, tokenizer, data, max_len):
    model.eval()
    probs = []
    with torch.no_grad():
        for i in range(0, len(data), 64):
            texts = [t for t, _ in data[i : i + 64]]
            enc = tokenizer(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
            probs.append(torch.softmax(model(**enc).logits, -1))
    return torch.cat(probs)


def metrics(probs, truth):
    pred = probs.argmax(-1).tolist()
    out = {
        "accuracy": sum(p == t for p, t in zip(pred, truth)) / len(truth),
        "macro_f1": macro_f1(truth, pred, probs.shape[1]),
    }
    if probs.shape[1] == 2:
        out["auc"] = auc(truth, probs[:, 1].tolist())
    return out


class MeanPooled(torch.nn.Module):
    """A classifier on the mean of the encoder's token states, padding excluded (Flywheel's `mean` head)."""

    def __init__(self, encoder, labels):
        super().__init__()
        self.encoder = encoder
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, labels)
        torch.nn.init.normal_(self.classifier.weight, std=0.02)
        torch.nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return SimpleNamespace(logits=self.classifier((hidden * m).sum(1) / m.sum(1)))


def recipe(overrides):
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        sys.exit(f"peft_classify.py cannot express {sorted(unknown)}")
    r = {**DEFAULTS, **overrides}
    if r["learning_rate"] is None:
        r["learning_rate"] = 4e-3 if r["method"] == "lora" else 5e-5
    if r["epochs"] is None:
        r["epochs"] = 3 if r["method"] == "lora" else 5
    if r["pooling"] is None:  # Flywheel's: a fresh LoRA head pools the mean, full fine-tuning [CLS]
        r["pooling"] = "mean" if r["method"] == "lora" else "cls"
    return r


def main():
    cli = argparse.ArgumentParser()
    cli.add_argument("--params", default="{}")
    for name in ("model_dir", "train_path", "test_path", "labels", "out_path"):
        cli.add_argument(name)
    cli.add_argument("save_dir", nargs="?")
    args = cli.parse_args()
    r = recipe(json.loads(args.params))
    model_dir, out_path, save_dir = args.model_dir, args.out_path, args.save_dir
    labels = args.labels.split(",")
    EPOCHS, BATCH, MAX_LEN, WD = r["epochs"], r["batch_size"], r["max_length"], r["weight_decay"]
    WARMUP, SMOOTH, VAL, PATIENCE, SEED = (r["warmup_ratio"], r["label_smoothing"], r["val_fraction"],
                                           r["patience"], r["seed"])
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    torch.manual_seed(SEED)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # a tokenizer.json without a class transformers recognises
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json", pad_token="<pad>")
    with safe_open(f"{model_dir}/model.safetensors", "pt") as f:
        has_pooler = any("pooler." in k for k in f.keys())
    pattern = r".*encoder\.layer\.\d+\.(" + "|".join(
        MODULES[t].replace(".", r"\.") for t in r["targets"]) + ")"
    if r["method"] not in ("lora", "full") or r["pooling"] not in ("cls", "mean"):
        sys.exit(f"unknown method {r['method']!r} or pooling {r['pooling']!r}")
    if r["pooling"] == "mean":
        if r["method"] != "lora" or save_dir:
            sys.exit("a mean head is LoRA only, and not a PEFT sequence classifier to save")
        encoder = BertModel.from_pretrained(model_dir, add_pooling_layer=False)
        encoder = get_peft_model(encoder, LoraConfig(r=r["rank"], lora_alpha=r["alpha"],
                                                     lora_dropout=r["lora_dropout"], target_modules=pattern))
        model = MeanPooled(encoder, len(labels))
    else:
        model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    if r["method"] == "lora" and r["pooling"] == "cls":
        own_pooler = r["train_pooler"] or not has_pooler
        modules_to_save = ["classifier"] + (["pooler"] if own_pooler else [])
        config = LoraConfig(task_type="SEQ_CLS", r=r["rank"], lora_alpha=r["alpha"],
                            lora_dropout=r["lora_dropout"], target_modules=pattern,
                            modules_to_save=modules_to_save)
        model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    data = rows(args.train_path, labels)
    test = rows(args.test_path, labels)
    train, val = split(data, VAL, SEED)
    steps = EPOCHS * ((len(train) + BATCH - 1) // BATCH)
    warm = max(1, round(steps * WARMUP))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # The classifier trains at head_learning_rate, as Flywheel's does; the rest at learning_rate.
    head = [p for n, p in named if "classifier" in n]
    body = [p for n, p in named if not any(p is h for h in head)]
    head_lr = r["head_learning_rate"] or r["learning_rate"]
    opt = torch.optim.AdamW([{"params": body, "lr": r["learning_rate"]}, {"params": head, "lr": head_lr}],
                            weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=SMOOTH)
    rng = random.Random(SEED)
    best, best_state, since, best_epoch = -1.0, None, 0, 0
    started = time.time()
    history = []
    for epoch in range(EPOCHS):
        model.train()
        order = list(train)
        rng.shuffle(order)
        for i in range(0, len(order), BATCH):
            chunk = order[i : i + BATCH]
            enc = tokenizer([t for t, _ in chunk], truncation=True, max_length=MAX_LEN, padding=True,
                            return_tensors="pt")
            loss = loss_fn(model(**enc).logits, torch.tensor([y for _, y in chunk]))
            loss.backward()
            if r["max_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], r["max_grad_norm"])
            opt.step()
            sched.step()
            opt.zero_grad()
        f1 = metrics(scores(model, tokenizer, val, MAX_LEN), [y for _, y in val])["macro_f1"]
        history.append(round(f1, 4))
        print(f"epoch {epoch + 1}: val macro-F1 {f1:.4f}", file=sys.stderr)
        if f1 >= best:  # ties go to the later epoch, as in Flywheel
            best, since, best_epoch = f1, 0, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= PATIENCE:
                break
    model.load_state_dict(best_state)
    wall = time.time() - started
    probs = scores(model, tokenizer, test, MAX_LEN)
    result = {"test": metrics(probs, [y for _, y in test]),
              "val_macro_f1": best, "wall_seconds": wall, "trainable_params": trainable,
              "train_rows": len(train), "val_rows": len(val), "best_epoch": best_epoch, "val_history": history,
              "recipe": r}
    if save_dir:
        model.save_pretrained(save_dir)
        result["test_probs"] = scores(model, tokenizer, test, SERVE_MAX_LEN).tolist()
    json.dump(result, open(out_path, "w"), indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "test_probs"}))


if __name__ == "__main__":
    main()
