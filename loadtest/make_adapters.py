"""Writes N distinct PEFT SEQ_CLS LoRA adapters (r=8, alpha=16, query+value, random B, random 2-label head) on
all-MiniLM-L6-v2 for the adapter benchmarks, and times PEFT's own adapter loading for comparison.

    .venv/bin/python loadtest/make_adapters.py N OUT_DIR
"""
import json
import pathlib
import statistics
import sys
import time

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import BertForSequenceClassification

torch.set_num_threads(2)
torch.set_flush_denormal(True)


def main():
    n, out = int(sys.argv[1]), pathlib.Path(sys.argv[2])
    model_dir = sys.argv[3] if len(sys.argv) > 3 else "models/all-MiniLM-L6-v2"
    out.mkdir(parents=True, exist_ok=True)
    base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=["query", "value"], init_lora_weights=False)
    model = get_peft_model(base, config)
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.02 if "lora" in name else 0.5)
        model.save_pretrained(out / f"a{i:03d}")
        (out / f"a{i:03d}" / "README.md").unlink(missing_ok=True)
    # PEFT's load time for one r=8 adapter onto an already loaded base (what a hot swap costs there).
    times = []
    fresh = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(fresh, out / "a000", adapter_name="a000")
    for i in range(1, min(n, 11)):
        t = time.perf_counter()
        peft_model.load_adapter(out / f"a{i:03d}", adapter_name=f"a{i:03d}")
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"peft_load_adapter_ms_median": statistics.median(times), "samples": len(times)}))


if __name__ == "__main__":
    main()
