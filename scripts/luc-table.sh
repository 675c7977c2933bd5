#!/usr/bin/env bash
# The LUC measurement of docs/luc.md on SmolLM2-135M-Instruct: profile on the corpus's
# train split, one policy per (budget, method), compress, and perplexity on test.txt
# (ctx 512, llama.cpp protocol). Writes $OUT/luc.jsonl (one line per run) and prints a table.
#
#   SAMPLES=32 SEQ=512 CHUNKS=   scripts/luc-table.sh        # CHUNKS empty = the whole file
#
# REFINE=N (default 6) refines `optimal` by measurement (`edgec policy --refine N`): three
# starts and N moves, each a whole compression (GPTQ + SparseGPT on RSAMPLES x 512 tokens of
# train.txt, default $CSAMPLES: the final compression's) measured on RTEXT_SAMPLES x 512
# tokens of valid.txt (default 64; never test.txt). REFINE=0 gives the knapsack alone.
#
# The profile measures every layer's end-to-end loss delta for three candidates
# (E2E_CANDIDATES, on E2E_SAMPLES samples), which OBJECTIVE=loss-fit or loss-measured turns
# into per-layer loss gains (the default objective, linear-nmse, does not need them); every
# method reads the same profile and objective.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-luc-out}
SAMPLES=${SAMPLES:-32}
SEQ=${SEQ:-512}
CSAMPLES=${CSAMPLES:-$SAMPLES}
CSEQ=${CSEQ:-$SEQ}
CHUNKS=${CHUNKS:-}
METHODS=${METHODS:-uniform edge-llm optimal}
OBJECTIVE=${OBJECTIVE:-linear-nmse}
REFINE=${REFINE:-6}
RSAMPLES=${RSAMPLES:-$CSAMPLES}
RTEXT_SAMPLES=${RTEXT_SAMPLES:-64}
E2E_CANDIDATES=${E2E_CANDIDATES:-3b-g32-asym,3b-g32-asym-s0.50,4b-g32-asym-s0.30}
E2E_SAMPLES=${E2E_SAMPLES:-4}
BUDGETS=${BUDGETS:-bits=3.5 bits=4,sparsity=0.3 bits=3,sparsity=0.5}
mkdir -p "$OUT"
if [ -z "${EDGEC:-}" ]; then cargo build --release --bin edgec; fi
E=${EDGEC:-target/release/edgec}
M=$(scripts/fetch-model.sh)
chunks=(); [ -n "$CHUNKS" ] && chunks=(--chunks "$CHUNKS")
if [ ! -f "$OUT/sensitivity.json" ]; then
  /usr/bin/time -v $E profile --model "$M" --calib data/austen/train.txt --samples "$SAMPLES" --seq "$SEQ" \
    --e2e-layers all --e2e-candidates "$E2E_CANDIDATES" --e2e-samples "$E2E_SAMPLES" \
    -o "$OUT/sensitivity.json" 2> "$OUT/profile.time"
fi
: > "$OUT/luc.jsonl"
for B in $BUDGETS; do
  for METHOD in $METHODS; do
    tag="$(echo "$B" | tr ',=' '__')-$METHOD"
    refine=()
    if [ "$METHOD" = optimal ] && [ "$REFINE" -gt 0 ]; then
      refine=(--refine "$REFINE" --refine-text data/austen/valid.txt --model "$M" --calib data/austen/train.txt
              --samples "$RSAMPLES" --seq "$CSEQ" --refine-samples "$RTEXT_SAMPLES"
              --trials-out "$OUT/$tag.trials.jsonl")
    fi
    if ! $E policy --profile "$OUT/sensitivity.json" --budget "$B" --method "$METHOD" --objective "$OBJECTIVE" \
        "${refine[@]}" -o "$OUT/$tag.toml" > "$OUT/$tag.policy.txt" 2>&1; then
      echo "{\"budget\":\"$B\",\"method\":\"$METHOD\",\"error\":\"policy failed\"}" >> "$OUT/luc.jsonl"; continue
    fi
    $E compress --model "$M" --policy "$OUT/$tag.toml" --calib data/austen/train.txt \
      --samples "$CSAMPLES" --seq "$CSEQ" -o "$OUT/$tag" --json > "$OUT/$tag.compress.json"
    $E eval --model "$OUT/$tag" --text data/austen/test.txt --ctx 512 "${chunks[@]}" --json > "$OUT/$tag.eval.json"
    python3 - "$B" "$METHOD" "$OUT/$tag.compress.json" "$OUT/$tag.eval.json" "$OBJECTIVE" >> "$OUT/luc.jsonl" <<'PY'
import json, sys
b, m, c, e = sys.argv[1:5]
c, e = json.load(open(c)), json.load(open(e))
print(json.dumps({"budget": b, "method": m, "objective": sys.argv[5], "linear_bytes": c["linear_bytes"], "bits_per_weight": c["bits_per_weight"],
                  "sparsity": c["sparsity"], "perplexity": e["perplexity"], "chunks": e["chunks"]}))
PY
    tail -n 1 "$OUT/luc.jsonl"
  done
done
