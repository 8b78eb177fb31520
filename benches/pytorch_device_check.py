"""PyTorch's side of scripts/gpu-check.sh: inference and a LoRA training step at the shapes
`flywheel device-check` times, on a BERT with all-MiniLM-L6-v2's shapes and random weights, in f32 and under
bf16 autocast, on the GPU or the CPU.

Inference: the encoder in eval mode, mean pooling, embeddings copied to the host. LoRA step: PEFT LoRA
(r=8, alpha=16, dropout 0.1 on query and value, a 2-label head) with AdamW (lr 2e-3, weight decay 0.01),
forward, backward and update; BERT's own dropout stays on (train mode, as a fine-tuning run has it). Where
peft is not installed, the same LoRA is written out with plain torch modules, and the report says so.

    python3 benches/pytorch_device_check.py --device cuda --json out.json [--infer 32x128] [--train 64x128]
"""
import argparse
import json
import statistics
import sys
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

SHAPES = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)


def shape(text):
    batch, tokens = text.lower().split("x")
    return int(batch), int(tokens)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inputs(batch, length, device):
    generator = torch.Generator().manual_seed(batch * length)
    ids = torch.randint(1000, 29000, (batch, length), generator=generator).to(device)
    return ids, torch.ones_like(ids)


def autocast(device, precision):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def time_inference(model, device, precision, batch, length, seconds):
    ids, mask = inputs(batch, length, device)

    def once():
        with torch.inference_mode(), autocast(device, precision):
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).float()
            (hidden * weights).sum(1).div(weights.sum(1)).cpu()

    once()
    once()
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        once()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), len(times)


class LoraLinear(torch.nn.Module):
    """A frozen linear layer plus `scale · B(A(dropout(x)))`, initialised as PEFT does (B zero)."""

    def __init__(self, base, rank=8, alpha=16, dropout=0.1):
        super().__init__()
        self.base = base
        self.dropout = torch.nn.Dropout(dropout)
        self.a = torch.nn.Linear(base.in_features, rank, bias=False)
        self.b = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.a.weight, a=5 ** 0.5)
        torch.nn.init.zeros_(self.b.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.b(self.a(self.dropout(x))) * self.scale


def lora_model(device):
    model = BertForSequenceClassification(BertConfig(**SHAPES, num_labels=2))
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        for p in model.parameters():
            p.requires_grad = False
        for layer in model.bert.encoder.layer:
            attention = layer.attention.self
            attention.query = LoraLinear(attention.query)
            attention.value = LoraLinear(attention.value)
        for p in model.classifier.parameters():
            p.requires_grad = True
        return model.to(device), "torch (peft not installed: LoRA as plain modules)"
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=["query", "value"])
    return get_peft_model(model, config).to(device), "peft"


def time_lora_step(device, precision, batch, length, steps):
    model, path = lora_model(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3,
                                  weight_decay=0.01)
    ids, mask = inputs(batch, length, device)
    labels = (torch.arange(batch) % 2).to(device)
    times = []
    for step in range(steps + 2):
        t = time.perf_counter()
        with autocast(device, precision):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), steps, path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--infer", type=shape, default=(32, 128))
    parser.add_argument("--train", type=shape, default=(64, 128))
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
        torch.set_flush_denormal(True)
    torch.manual_seed(0)
    report = {
        "torch": torch.__version__,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "timings": [],
    }
    report["errors"] = []
    # Each timing runs on its own: one that fails is recorded and the others still run.
    encoder = BertModel(BertConfig(**SHAPES), add_pooling_layer=False).to(device).eval()
    for precision in ["f32", "bf16"]:
        try:
            ms, n = time_inference(encoder, device, precision, *args.infer, args.seconds)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            report["errors"].append(f"{precision} inference: {e!r}")
            continue
        report["timings"].append(dict(what="inference", path="torch", precision=precision, batch=args.infer[0],
                                      length=args.infer[1], median_ms=ms, repeats=n))
        print(f"time {precision:<4} inference  torch     {args.infer[0]:>3} x {args.infer[1]:<4} {ms:9.2f} ms")
    for precision in ["f32", "bf16"]:
        try:
            ms, n, path = time_lora_step(device, precision, *args.train, args.steps)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            report["errors"].append(f"{precision} LoRA step: {e!r}")
            continue
        report["timings"].append(dict(what="lora_step", path=path, precision=precision, batch=args.train[0],
                                      length=args.train[1], median_ms=ms, repeats=n))
        print(f"time {precision:<4} lora_step  {path.split()[0]:<9} {args.train[0]:>3} x {args.train[1]:<4} {ms:9.2f} ms")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    for error in report["errors"]:
        print(f"FAIL {error}")
    sys.exit(1 if report["errors"] else 0)


if __name__ == "__main__":
    main()
