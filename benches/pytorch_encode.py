"""PyTorch forward-pass timings at the shapes of benches/encode.rs (median of >= 3 s of repeats).

    .venv/bin/python benches/pytorch_encode.py
"""
import time

import torch
from transformers import AutoModel

torch.set_num_threads(2)
torch.set_flush_denormal(True)
model = AutoModel.from_pretrained("models/all-MiniLM-L6-v2").eval()
for batch, length in [(1, 32), (1, 128), (1, 256), (8, 32), (32, 32), (32, 128), (8, 256)]:
    ids = torch.randint(1000, 20000, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < 3 or len(times) < 5:
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    print(f"{batch:>3} x {length:<4} torch {times[len(times) // 2]:8.2f} ms")
