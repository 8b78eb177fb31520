"""PEFT LoRA and full fine-tuning training steps on all-MiniLM-L6-v2 at 16 x L tokens (L = 48 unless given;
2 threads, flush-denormal), to compare with `cargo bench --bench train_step [-- L]`. Median of steps 3 to 10.
Train mode, as a fine-tuning run has it: BERT's own dropout (0.1) is on too, which Flywheel's encoder lacks.

    .venv/bin/python benches/pytorch_train_step.py [L]
"""
import statistics
import sys
import time

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import BertForSequenceClassification

torch.set_num_threads(2)
torch.set_flush_denormal(True)
LEN = int(sys.argv[1]) if len(sys.argv) > 1 else 48


def steps(model, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    ids = (torch.arange(16 * LEN).reshape(16, LEN) * 37) % 20000 + 1000
    mask = torch.ones_like(ids)
    labels = torch.arange(16) % 2
    times = []
    model.train()
    for i in range(10):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


base = BertForSequenceClassification.from_pretrained("models/all-MiniLM-L6-v2", num_labels=2)
lora = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                                       target_modules=["query", "value"]))
print(f"peft LoRA step 16 x {LEN}: median {steps(lora, 2e-3):.0f} ms")
full = BertForSequenceClassification.from_pretrained("models/all-MiniLM-L6-v2", num_labels=2)
print(f"pytorch full fine-tuning step 16 x {LEN}: median {steps(full, 5e-5):.0f} ms")
