"""ONNX Runtime's dynamically quantised int8 all-MiniLM-L6-v2, timed at the shapes of benches/encode.rs
(equal-length synthetic sequences, median of >= 3 s of repeats, 2 threads), beside ONNX Runtime in f32.

The model is exported from the Hugging Face directory with torch.onnx, then quantised with
`onnxruntime.quantization.quantize_dynamic` (int8 weights per channel, activations quantised per call: the
usual recipe for BERT encoders on CPUs). Both files go to target/bench/onnx/.

    .venv/bin/pip install onnxruntime onnx onnxscript
    .venv/bin/python benches/onnx_int8_encode.py
"""
import os
import time

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import AutoModel

OUT = "target/bench/onnx"
SHAPES = [(1, 32), (1, 128), (1, 256), (8, 32), (32, 32), (32, 128), (8, 256)]


def export():
    os.makedirs(OUT, exist_ok=True)
    f32, int8 = f"{OUT}/minilm-f32.onnx", f"{OUT}/minilm-int8.onnx"
    if not os.path.exists(f32):
        model = AutoModel.from_pretrained("models/all-MiniLM-L6-v2").eval()

        class Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = model

            def forward(self, input_ids, attention_mask):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        ids = torch.ones(1, 16, dtype=torch.long)
        torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids)), f32, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"},
                                        "last_hidden_state": {0: "batch", 1: "tokens"}})
    if not os.path.exists(int8):
        quantize_dynamic(f32, int8, weight_type=QuantType.QInt8, per_channel=True)
    return f32, int8


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def median_ms(run):
    for _ in range(3):
        run()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < 3 or len(times) < 5:
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    f32, int8 = export()
    sessions = {"ort f32": session(f32), "ort int8": session(int8)}
    for batch, length in SHAPES:
        # The same synthetic ids as benches/encode.rs.
        seq = [1000 + (i * 37) % 20000 for i in range(length)]
        feed = {"input_ids": np.array([seq] * batch, dtype=np.int64),
                "attention_mask": np.ones((batch, length), dtype=np.int64)}
        times = {name: median_ms(lambda s=s: s.run(None, feed)) for name, s in sessions.items()}
        print(f"{batch:>3} x {length:<4} " + "   ".join(f"{name} {ms:8.2f} ms" for name, ms in times.items()))


if __name__ == "__main__":
    main()
