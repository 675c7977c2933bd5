#!/usr/bin/env bash
# Writes the reference token ids of the GGUF tokenizer test (compiler/tests/gguf_tokenizer.rs):
# llama.cpp's `llama-tokenize` on the SmolLM2 GGUF, one file of space-separated ids per text.
#
#   scripts/gguf-make-token-refs.sh [LLAMA_TOKENIZE]   # default /tmp/llamacpp/bin/llama-tokenize
#
# --no-escape: read the file verbatim (llama-tokenize would otherwise turn "\n" written as two
# characters into a newline). Special tokens are parsed (the tool's default), the model's
# add_bos_token (false for this GGUF) decides BOS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOK=${1:-/tmp/llamacpp/bin/llama-tokenize}
MODEL=$("$ROOT/scripts/fetch-model.sh")
OUT="$ROOT/tests/data/gguf"
for pair in "austen-test:$ROOT/data/austen/test.txt" "austen-valid:$ROOT/data/austen/valid.txt" \
            "tokenizer-edge:$OUT/tokenizer-edge.txt"; do
  name=${pair%%:*}; file=${pair#*:}
  "$TOK" -m "$MODEL" -f "$file" --ids --no-escape --log-disable 2>/dev/null \
    | tr -d '[],\n' | sed 's/^ *//' > "$OUT/$name.ids"
  echo "$name: $(wc -w < "$OUT/$name.ids") tokens -> $OUT/$name.ids" >&2
done
