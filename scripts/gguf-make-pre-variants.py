#!/usr/bin/env python3
"""Writes vocabulary-only copies of a GGUF with another `tokenizer.ggml.pre`, so llama.cpp's
`llama-tokenize` can show how it splits text for each pre-tokenizer with the same vocabulary.

    python3 scripts/gguf-make-pre-variants.py MODEL.gguf OUT_DIR PRE [PRE ...]

Writes OUT_DIR/vocab.<PRE>.gguf for each PRE: every metadata key of MODEL.gguf (arrays and
all) with `tokenizer.ggml.pre` set to PRE, and no tensors (llama-tokenize loads the
vocabulary only). Needs the PyPI package `gguf` (gguf-py).
"""

import sys
from pathlib import Path

import gguf
from gguf import GGUFValueType as V


def field_value(f):
    t = f.types[0]
    if t == V.ARRAY:
        sub = f.types[1]
        if sub == V.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data], t, sub
        return [f.parts[i].tolist()[0] for i in f.data], t, sub
    if t == V.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8"), t, None
    return f.parts[f.data[0]].tolist()[0], t, None


def main() -> None:
    src, out_dir, pres = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    out_dir.mkdir(parents=True, exist_ok=True)
    r = gguf.GGUFReader(str(src))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    for pre in pres:
        w = gguf.GGUFWriter(str(out_dir / f"vocab.{pre}.gguf"), arch=arch)
        for key, f in r.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            val, t, sub = field_value(f)
            if key == "tokenizer.ggml.pre":
                val = pre
            w.add_key_value(key, val, t, sub)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print(out_dir / f"vocab.{pre}.gguf")


if __name__ == "__main__":
    main()
