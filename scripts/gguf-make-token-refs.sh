#!/usr/bin/env bash
# Writes the reference token ids of the GGUF tokenizer test (compiler/tests/gguf_tokenizer.rs):
# llama.cpp's `llama-tokenize` with the SmolLM2 GGUF's vocabulary, one file of space-separated
# ids per text.
#
#   PYTHON=/path/to/python-with-gguf scripts/gguf-make-token-refs.sh [LLAMA_TOKENIZE]
#
# LLAMA_TOKENIZE defaults to /tmp/llamacpp/bin/llama-tokenize. PYTHON (default python3) needs
# the PyPI package `gguf`; it writes vocabulary-only copies of the GGUF with other
# `tokenizer.ggml.pre` values (scripts/gguf-make-pre-variants.py) to check those pre-tokenizers.
#
# --no-escape: read the file verbatim (llama-tokenize would otherwise turn "\n" written as two
# characters into a newline). Special tokens are parsed (the tool's default); the GGUF's
# add_bos_token (false) decides BOS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOK=${1:-/tmp/llamacpp/bin/llama-tokenize}
PY=${PYTHON:-python3}
MODEL=$("$ROOT/scripts/fetch-model.sh")
OUT="$ROOT/tests/data/gguf"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

tokenize() { # model text out
  "$TOK" -m "$1" -f "$2" --ids --no-escape --log-disable 2>/dev/null | tr -d '[],\n' | sed 's/^ *//' > "$3"
  echo "$(basename "$3"): $(wc -w < "$3") tokens" >&2
}

# The SmolLM2 GGUF as it is (pre-tokenizer `smollm`).
tokenize "$MODEL" "$ROOT/data/austen/test.txt" "$OUT/austen-test.ids"
tokenize "$MODEL" "$ROOT/data/austen/valid.txt" "$OUT/austen-valid.ids"
tokenize "$MODEL" "$OUT/tokenizer-edge.txt" "$OUT/tokenizer-edge.ids"

# The same vocabulary under other pre-tokenizers: the edge-case text and the first 30,000
# bytes of valid.txt (ASCII, so the cut is a character boundary).
head -c 30000 "$ROOT/data/austen/valid.txt" > "$tmp/valid30k.txt"
"$PY" "$ROOT/scripts/gguf-make-pre-variants.py" "$MODEL" "$tmp" gpt-2 default llama-bpe > /dev/null
for pre in gpt-2 default llama-bpe; do
  tokenize "$tmp/vocab.$pre.gguf" "$OUT/tokenizer-edge.txt" "$OUT/pre-$pre.edge.ids"
  tokenize "$tmp/vocab.$pre.gguf" "$tmp/valid30k.txt" "$OUT/pre-$pre.valid30k.ids"
done
