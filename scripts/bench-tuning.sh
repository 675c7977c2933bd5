#!/usr/bin/env bash
# Side-by-side LoRA tuning on SmolLM2-135M, in one run on this machine: PyTorch + PEFT
# full-depth LoRA (bench/peft/bench_peft.py), `edgec tune --mode full` and
# `edgec tune --mode edge` (stride 6 on 30 layers: exits 5, 11, 17, 23, 29), all at seq 256,
# batch 1, rank 8 (alpha 16) on q,k,v,o,gate,up,down, AdamW lr 4e-4, THREADS threads.
# ROUNDS rounds, interleaved; a table of medians is printed at the end (raw JSON in $OUT).
# With QUALITY=1 it also tunes edge and full for the same number of tokens and reports the
# validation perplexity (valid.txt, ctx 256) before and after, per exit and voting mode.
# With COMPRESSED=1 it also tunes a 4-bit LUC-compressed model (edge and full).
#
#   scripts/bench-tuning.sh                  # ROUNDS=2 THREADS=2 OUT=target/bench-tuning
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-2}
OUT=${OUT:-target/bench-tuning}
STEPS=${STEPS:-12}          # timed steps of the full-depth runs (after WARMUP)
WARMUP=${WARMUP:-3}
EDGE_STEPS=${EDGE_STEPS:-30} # 6 per exit
QSTEPS=${QSTEPS:-60}        # quality runs: steps of each mode (same tokens)
mkdir -p "$OUT"
cargo build --release --bin edgec
MODEL=$(scripts/fetch-model.sh)
VENV=$(bench/peft/setup.sh)
DATA=data/austen
E=target/release/edgec
tune() { # name args...
  local name=$1; shift
  rm -rf "$OUT/ad-$name"
  /usr/bin/time -v "$E" tune -m "$MODEL" --data $DATA/train.txt --seq 256 --rank 8 --threads "$THREADS" \
    --checkpoint-every 0 --json -o "$OUT/ad-$name" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.time"
}
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r: pytorch+peft full" >&2
  /usr/bin/time -v "$VENV/bin/python" bench/peft/bench_peft.py bench --model "$MODEL" --data $DATA/train.txt \
    --seq 256 --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" > "$OUT/peft-full-r$r.json" 2> "$OUT/peft-full-r$r.time"
  echo "round $r: edgec full" >&2
  tune "edgec-full-r$r" --mode full --steps $((STEPS + WARMUP))
  echo "round $r: edgec edge" >&2
  tune "edgec-edge-r$r" --mode edge --stride 6 --steps "$EDGE_STEPS"
  echo "round $r: edgec edge on 2 local samples (3 epochs per phase: the prefix cache hits)" >&2
  tune "edgec-edge-epochs-r$r" --mode edge --stride 6 --steps "$EDGE_STEPS" --max-samples 2
  echo "round $r: edgec edge, window activations recomputed before the backward" >&2
  tune "edgec-edge-recompute-r$r" --mode edge --stride 6 --steps "$EDGE_STEPS" --recompute
done
if [ "${COMPRESSED:-0}" = 1 ]; then
  if [ ! -f "$OUT/luc4/edge-model.json" ]; then
    "$E" policy --profile docs/luc/smollm2-sensitivity.json --budget bits=4 --method optimal -o "$OUT/luc4.toml" >&2
    "$E" compress -m "$MODEL" --policy "$OUT/luc4.toml" --calib $DATA/train.txt --samples 8 --seq 256 -o "$OUT/luc4" >&2
  fi
  for mode in full edge; do
    echo "compressed model: edgec $mode" >&2
    rm -rf "$OUT/ad-luc4-$mode"
    /usr/bin/time -v "$E" tune -m "$OUT/luc4" --data $DATA/train.txt --seq 256 --rank 8 --threads "$THREADS" \
      --checkpoint-every 0 --json -o "$OUT/ad-luc4-$mode" --mode $mode --stride 6 \
      --steps $([ $mode = full ] && echo $((STEPS + WARMUP)) || echo "$EDGE_STEPS") \
      > "$OUT/luc4-$mode.jsonl" 2> "$OUT/luc4-$mode.time"
  done
fi
if [ "${QUALITY:-0}" = 1 ]; then
  "$E" eval -m "$MODEL" --text $DATA/valid.txt --ctx 256 --chunks 40 --threads "$THREADS" --json > "$OUT/valid-base.json"
  for mode in full edge; do
    echo "quality: $mode, $QSTEPS steps" >&2
    rm -rf "$OUT/ad-q-$mode"
    "$E" tune -m "$MODEL" --data $DATA/train.txt --valid $DATA/valid.txt --valid-ctx 256 --valid-chunks 40 \
      --seq 256 --rank 8 --threads "$THREADS" --checkpoint-every 0 --json -o "$OUT/ad-q-$mode" \
      --mode $mode --stride 6 --steps "$QSTEPS" > "$OUT/quality-$mode.jsonl" 2> /dev/null
  done
fi
if [ -d "$OUT/ad-q-full" ]; then
  # PEFT loads the adapters edgec wrote: the same loss on the same token ids.
  python3 -c "import random; r = random.Random(7); print('\n'.join(' '.join(str(r.randrange(1, 49152)) for _ in range(64)) for _ in range(2)))" > "$OUT/check-ids.txt"
  "$E" eval -m "$MODEL" --adapters "$OUT/ad-q-full" --tokens "$OUT/check-ids.txt" --json > "$OUT/check-edgec.json"
  "$VENV/bin/python" bench/peft/bench_peft.py check --model "$MODEL" --adapters "$OUT/ad-q-full" \
    --tokens "$OUT/check-ids.txt" > "$OUT/check-peft.json" 2> /dev/null
fi
python3 scripts/bench-tuning-summarize.py "$OUT"
