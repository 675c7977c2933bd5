#!/usr/bin/env python3
"""Writes the GGUF dequantization fixture of Edge-LLM's GGUF reader tests.

    python3 scripts/gguf-make-fixture.py VARIANTS_DIR OUT_DIR

VARIANTS_DIR holds SmolLM2-135M-Instruct re-quantized by llama.cpp's `llama-quantize`
(see tests/data/gguf/PROVENANCE.md for the exact commands):

    smol.Q4_1.gguf (the original file), smol.Q8_0.gguf, smol.Q4_0.gguf, smol.Q4_K_M.gguf,
    smol.Q5_K_M.gguf, smol.Q6_K.gguf, smol.F16.gguf, smol.BF16.gguf

For every tensor type it copies the first ROWS rows (whole quantization blocks, byte for
byte) of one real tensor into OUT_DIR/quants.gguf, and writes what gguf-py's reference
dequantizers (`gguf.quants.dequantize`) make of those bytes to OUT_DIR/quants-ref.safetensors
(f32, same names, HF/numpy dim order [rows, cols]). The GGUF also carries one metadata key
of every GGUF value type (incl. nested arrays) and a non-default `general.alignment`, so the
Rust reader's metadata parsing is checked against gguf-py's writer too.

Needs the PyPI packages `gguf` (gguf-py), `numpy` and `safetensors`.
"""

import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

# (fixture name, source file, source tensor name suffix, type, rows): the first tensor in
# file order whose name ends with the suffix and whose type is `type` is used.
PICKS = [
    ("q8_0", "smol.Q8_0.gguf", "attn_q.weight", Q.Q8_0, 4),
    ("q4_0", "smol.Q4_0.gguf", "ffn_gate.weight", Q.Q4_0, 4),
    ("q4_1", "smol.Q4_1.gguf", "attn_k.weight", Q.Q4_1, 4),
    ("q5_0", "smol.Q4_K_M.gguf", "attn_q.weight", Q.Q5_0, 4),
    ("q5_1", "smol.Q5_K_M.gguf", "attn_q.weight", Q.Q5_1, 4),
    ("q4_k", "smol.Q4_K_M.gguf", "ffn_down.weight", Q.Q4_K, 4),
    ("q5_k", "smol.Q5_K_M.gguf", "ffn_down.weight", Q.Q5_K, 4),
    ("q6_k", "smol.Q6_K.gguf", "ffn_down.weight", Q.Q6_K, 4),
    ("f16", "smol.F16.gguf", "attn_q.weight", Q.F16, 4),
    ("bf16", "smol.BF16.gguf", "attn_q.weight", Q.BF16, 4),
    ("f32", "smol.Q4_1.gguf", "attn_norm.weight", Q.F32, 1),
]

ALIGNMENT = 64


def main() -> None:
    src_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out_dir / "quants.gguf"), arch="edge-fixture")
    w.add_custom_alignment(ALIGNMENT)
    V = gguf.GGUFValueType
    w.add_key_value("fixture.u8", 200, V.UINT8)
    w.add_key_value("fixture.i8", -100, V.INT8)
    w.add_key_value("fixture.u16", 60000, V.UINT16)
    w.add_key_value("fixture.i16", -30000, V.INT16)
    w.add_key_value("fixture.u32", 4000000000, V.UINT32)
    w.add_key_value("fixture.i32", -2000000000, V.INT32)
    w.add_key_value("fixture.f32", 0.25, V.FLOAT32)
    w.add_key_value("fixture.bool", True, V.BOOL)
    w.add_key_value("fixture.string", "héllo, GGUF", V.STRING)
    w.add_key_value("fixture.u64", 2**63 + 5, V.UINT64)
    w.add_key_value("fixture.i64", -(2**62), V.INT64)
    w.add_key_value("fixture.f64", -1.5e300, V.FLOAT64)
    w.add_key_value("fixture.array_i32", [1, -2, 3], V.ARRAY, V.INT32)
    w.add_key_value("fixture.array_str", ["a", "", "ß"], V.ARRAY, V.STRING)
    w.add_key_value("fixture.array_nested", [[1, 2], [3]], V.ARRAY, V.ARRAY)

    refs = {}
    for name, fname, tname, qtype, rows in PICKS:
        r = gguf.GGUFReader(str(src_dir / fname))
        t = next(t for t in r.tensors if t.name.endswith(tname) and t.tensor_type == qtype)
        cols = int(t.shape[0])  # ne[0]: the row length
        block, bsize = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = cols // block * bsize
        raw = np.frombuffer(bytes(np.asarray(t.data).reshape(-1).view(np.uint8)[: rows * row_bytes]), dtype=np.uint8)
        if len(t.shape) == 1:
            shape_np = [cols]
        else:
            raw = raw.reshape(rows, row_bytes)
            shape_np = [rows, cols]
        # gguf-py takes the bytes with their numpy (outermost-first) byte shape and derives
        # the element shape from the type's block size.
        w.add_tensor(name, raw, raw_dtype=qtype)
        ref = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(shape_np)
        refs[name] = np.ascontiguousarray(ref)
        print(f"{name}: {fname}:{t.name} {qtype.name} rows {rows} cols {cols} bytes {raw.size}")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(refs, str(out_dir / "quants-ref.safetensors"), metadata={"made_by": "gguf.quants.dequantize (gguf-py %s)" % gguf_version()})

    # Self-check: gguf-py reads the fixture back and gets the same numbers.
    back = gguf.GGUFReader(str(out_dir / "quants.gguf"))
    assert back.alignment == ALIGNMENT
    for t in back.tensors:
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(refs[t.name].shape)
        assert np.array_equal(got, refs[t.name]), t.name


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


if __name__ == "__main__":
    main()
