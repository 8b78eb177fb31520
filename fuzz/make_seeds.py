#!/usr/bin/env python3
"""Writes the adapter_loader seeds into fuzz/seeds/adapter_loader/ (standard library only).

Each seed is one fuzz input: [flags u8][config_len u16 LE][sidecar_len u16 LE][config][sidecar][weights],
the layout fuzz_targets/adapter_loader.rs splits. flags bit 0 picks the model (0 = BertConfig::tiny():
2 layers, hidden 32, intermediate 64; 1 = micro: 1 layer, hidden 8, intermediate 16); bit 1 asks for mean
pooling when no sidecar names a head. Weights are safetensors written by hand: an 8-byte little-endian
header length, the JSON header (padded with spaces to a multiple of 8), then the tensor bytes in order.

Every seed but the last two decodes successfully; check with
    FLYWHEEL_FUZZ_VERBOSE=1 cargo +nightly fuzz run adapter_loader fuzz/seeds/adapter_loader/*
"""

import json
import math
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "adapter_loader")

TINY = {"hidden": 32, "inter": 64, "layers": 2}
MICRO = {"hidden": 8, "inter": 16, "layers": 1}

PATHS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}


def linear_shape(model, target):
    h, i = model["hidden"], model["inter"]
    return {"intermediate": (h, i), "output": (i, h)}.get(target, (h, h))


def values(n, seed):
    return [round(0.3 * math.sin(seed * 7.1 + k * 0.37), 4) for k in range(n)]


def encode(dtype, xs):
    if dtype == "F32":
        return struct.pack(f"<{len(xs)}f", *xs)
    if dtype == "F16":
        return struct.pack(f"<{len(xs)}e", *xs)
    if dtype == "BF16":
        return b"".join(struct.pack("<H", struct.unpack("<I", struct.pack("<f", x))[0] >> 16) for x in xs)
    raise ValueError(dtype)


def safetensors(tensors, dtype="F32"):
    """tensors: list of (name, shape, flat values)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape, xs in tensors:
        data = encode(dtype, xs)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def lora(model, targets, r, prefix, default=False):
    out, seed = [], 1
    for layer in range(model["layers"]):
        for t in targets:
            i, o = linear_shape(model, t)
            base = f"{prefix}encoder.layer.{layer}.{PATHS[t]}"
            mid = ".default" if default else ""
            out.append((f"{base}.lora_A{mid}.weight", (r, i), values(r * i, seed)))
            out.append((f"{base}.lora_B{mid}.weight", (o, r), values(o * r, seed + 1)))
            seed += 2
    return out


def head(model, labels, pooler=False, modules_to_save=False, bias=True):
    h = model["hidden"]
    mts = ".modules_to_save.default" if modules_to_save else ""
    out = [(f"base_model.model.classifier{mts}.weight", (labels, h), values(labels * h, 90))]
    if bias:
        out.append((f"base_model.model.classifier{mts}.bias", (labels,), values(labels, 91)))
    if pooler:
        out.append((f"base_model.model.bert.pooler.dense{mts}.weight", (h, h), values(h * h, 92)))
        out.append((f"base_model.model.bert.pooler.dense{mts}.bias", (h,), values(h, 93)))
    return out


def config(**kw):
    c = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
         "bias": "none", "target_modules": ["query", "value"], "base_model_name_or_path": "tiny"}
    c.update(kw)
    return json.dumps(c, separators=(",", ":")).encode()


def seed(flags, cfg, weights, sidecar=b""):
    return struct.pack("<BHH", flags, len(cfg), len(sidecar)) + cfg + sidecar + weights


SEEDS = {
    # SEQ_CLS as Flywheel writes it: query+value LoRA r=4 on both layers, a 3-label classifier; sidecar.
    "tiny_seq_cls_qv_r4": seed(
        0,
        config(modules_to_save=["classifier"]),
        safetensors(lora(TINY, ["query", "value"], 4, "base_model.model.bert.") + head(TINY, 3)),
        json.dumps({"task": "sentiment", "labels": ["neg", "neu", "pos"], "head": "cls"}).encode(),
    ),
    # FEATURE_EXTRACTION names (no `bert.` level) on every linear, F16, no head, no sidecar.
    "micro_feature_all_targets_f16": seed(
        1,
        config(task_type="FEATURE_EXTRACTION", r=2, lora_alpha=4.0,
               target_modules=r".*encoder\.layer\.\d+\.(attention\.self\.query|output\.dense)"),
        safetensors(lora(MICRO, list(PATHS), 2, "base_model.model."), dtype="F16"),
    ),
    # PEFT's `.default.` and `modules_to_save` names, BF16, a trained pooler, rsLoRA, mean pooling flag.
    "micro_bf16_pooler_rslora": seed(
        1 | 2,
        config(r=1, lora_alpha=2.0, use_rslora=True, modules_to_save=["classifier", "pooler"],
               target_modules=["key"], inference_mode=True),
        safetensors(lora(MICRO, ["key"], 1, "base_model.model.bert.", default=True)
                    + head(MICRO, 2, pooler=True, modules_to_save=True), dtype="BF16"),
    ),
    # A head only (no LoRA factors), classifier without a bias; the sidecar asks for mean pooling.
    "tiny_head_only_mean": seed(
        0,
        config(r=1, target_modules=None),
        safetensors(head(TINY, 2, bias=False)),
        json.dumps({"labels": ["a", "b"], "head": "mean", "metrics": {"val_macro_f1": 0.9}}).encode(),
    ),
    # Refused: DoRA.
    "refused_dora": seed(1, config(use_dora=True, r=2),
                         safetensors(lora(MICRO, ["query"], 2, "base_model.model."))),
    # Refused: lora_A without its lora_B, rank disagreeing with r.
    "refused_unpaired": seed(1, config(r=3),
                             safetensors(lora(MICRO, ["value"], 2, "base_model.model.")[:1])),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
