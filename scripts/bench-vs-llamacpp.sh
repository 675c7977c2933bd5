#!/usr/bin/env bash
# Side-by-side speed and memory: Edge-LLM (`edgec bench`) and llama.cpp (`llama-bench`) on
# the same GGUF files, interleaved in one run, 1 and 2 threads, prefill 512 / decode 128,
# REPS repetitions each (median). Raw JSON goes to $OUT; a table is printed at the end.
#
#   scripts/llamacpp-build.sh          # once: builds the peer into /tmp/llamacpp
#   scripts/bench-vs-llamacpp.sh       # VARIANTS="F16 Q8_0" REPS=5 OUT=bench-out
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA=${LLAMACPP_BIN:-/tmp/llamacpp/bin}
REPS=${REPS:-5}
OUT=${OUT:-bench-out}
VARIANTS=${VARIANTS:-F16 Q8_0}
MODELS=${MODELS:-$HOME/.cache/edge-llm/models}
mkdir -p "$OUT"
cargo build --release --bin edgec
Q41=$(scripts/fetch-model.sh)
for V in $VARIANTS; do
  F="$MODELS/SmolLM2-135M-Instruct.$V.gguf"
  [ -f "$F" ] || "$LLAMA/llama-quantize" --allow-requantize "$Q41" "$F" "$V" 2 >/dev/null 2>&1
done
for round in 1 2; do
  for V in $VARIANTS; do
    F="$MODELS/SmolLM2-135M-Instruct.$V.gguf"
    for T in 1 2; do
      echo "round $round: $V, $T threads" >&2
      "$LLAMA/llama-bench" -m "$F" -p 512 -n 128 -t "$T" -r "$REPS" -o json > "$OUT/llamacpp-$V-t$T-r$round.json" 2>/dev/null
      /usr/bin/time -v target/release/edgec bench --model "$F" --threads "$T" --reps "$REPS" --json \
        > "$OUT/edgec-$V-t$T-r$round.json" 2> "$OUT/edgec-$V-t$T-r$round.time"
    done
    /usr/bin/time -v "$LLAMA/llama-bench" -m "$F" -p 0 -n 128 -t 2 -r 1 -o json > /dev/null 2> "$OUT/llamacpp-$V-mem.time"
  done
done
python3 scripts/bench-summarize.py "$OUT"
