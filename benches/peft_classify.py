#!/usr/bin/env python3
"""PEFT LoRA on a labelled JSONL split with Flywheel's default recipe, for side-by-side figures.

The recipe mirrors Flywheel's `/v1/train` defaults: LoRA r=8, alpha 16, dropout 0.1 on query and value, the
classifier (and, where the base checkpoint has none, the pooler) trained in full; AdamW lr 2e-3, weight decay
0.01, linear warm-up over 10 % then linear decay; label smoothing 0.1; batch 16; max length 128; 5 epochs with
a stratified 15 % validation split, keeping the best epoch by validation macro-F1 (patience 3).
PyTorch runs on 2 threads with denormals flushed.

With SAVE_DIR, the trained adapter is saved there (`save_pretrained`) and OUT.json also holds the test
probabilities at the server's truncation (256 tokens), so a server can load the adapter and be compared with
PyTorch.

Usage: peft_classify.py MODEL_DIR TRAIN.jsonl TEST.jsonl LABEL,LABEL,... OUT.json [SAVE_DIR]"""

import json
import random
import sys
import time

import torch
from classify_metrics import auc, macro_f1
from safetensors import safe_open
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, BertForSequenceClassification, PreTrainedTokenizerFast

EPOCHS, BATCH, MAX_LEN, LR, WD, WARMUP, SMOOTH, VAL, PATIENCE, SEED = 5, 16, 128, 2e-3, 0.01, 0.1, 0.1, 0.15, 3, 0
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


def scores(model, tokenizer, data, max_len=MAX_LEN):
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


def main():
    model_dir, train_path, test_path, labels, out_path = sys.argv[1:6]
    save_dir = sys.argv[6] if len(sys.argv) > 6 else None
    labels = labels.split(",")
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    torch.manual_seed(SEED)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # a tokenizer.json without a class transformers recognises
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json", pad_token="<pad>")
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    with safe_open(f"{model_dir}/model.safetensors", "pt") as f:
        has_pooler = any("pooler." in k for k in f.keys())
    modules_to_save = ["classifier"] + ([] if has_pooler else ["pooler"])
    config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=["query", "value"], modules_to_save=modules_to_save)
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    data = rows(train_path, labels)
    test = rows(test_path, labels)
    train, val = split(data, VAL, SEED)
    steps = EPOCHS * ((len(train) + BATCH - 1) // BATCH)
    warm = max(1, round(steps * WARMUP))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=SMOOTH)
    rng = random.Random(SEED)
    best, best_state, since = -1.0, None, 0
    started = time.time()
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
            opt.step()
            sched.step()
            opt.zero_grad()
        f1 = metrics(scores(model, tokenizer, val), [y for _, y in val])["macro_f1"]
        print(f"epoch {epoch + 1}: val macro-F1 {f1:.4f}", file=sys.stderr)
        if f1 > best:
            best, since = f1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= PATIENCE:
                break
    model.load_state_dict(best_state)
    wall = time.time() - started
    probs = scores(model, tokenizer, test)
    result = {"test": metrics(probs, [y for _, y in test]),
              "val_macro_f1": best, "wall_seconds": wall, "trainable_params": trainable,
              "train_rows": len(train), "val_rows": len(val)}
    if save_dir:
        model.save_pretrained(save_dir)
        result["test_probs"] = scores(model, tokenizer, test, SERVE_MAX_LEN).tolist()
    json.dump(result, open(out_path, "w"), indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "test_probs"}))


if __name__ == "__main__":
    main()
