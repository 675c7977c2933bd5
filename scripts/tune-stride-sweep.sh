#!/usr/bin/env bash
# The window stride's trade between speed, memory and quality on SmolLM2-135M (30 layers),
# `edgec tune --mode edge --stride S` beside `--mode full`; seq 256, batch 1, rank 8 on all
# seven projections, THREADS threads.
# - quality (PARTS=quality|both): each stride in STRIDES and `full` tune QSTEPS steps of the
#   same fresh samples, then score valid.txt (ctx 256, 40 chunks) for every voting mode;
#   these figures do not depend on the machine's load.
# - speed (PARTS=speed|both), ROUNDS interleaved rounds: `full` for 12 steps; each stride for
#   6 steps a phase on fresh samples (the prefix below the window runs every step), and for
#   8 steps a phase on 2 local samples, 6 of which read the prefix cache.
# A table of medians is printed at the end (scripts/tune-stride-sweep-summarize.py; raw
# JSON in $OUT).
#
#   scripts/tune-stride-sweep.sh    # STRIDES="3 5 6 10 15" QSTEPS=240 ROUNDS=2 OUT=target/stride-sweep
set -euo pipefail
cd "$(dirname "$0")/.."
STRIDES=${STRIDES:-3 5 6 10 15}
QSTEPS=${QSTEPS:-240}
THREADS=${THREADS:-2}
OUT=${OUT:-target/stride-sweep}
PARTS=${PARTS:-both}      # quality | speed | both
ROUNDS=${ROUNDS:-2}       # rounds of the speed runs (interleaved)
mkdir -p "$OUT"
cargo build --release --bin edgec
MODEL=$(scripts/fetch-model.sh)
DATA=data/austen
E=target/release/edgec
common=(-m "$MODEL" --seq 256 --rank 8 --threads "$THREADS" --checkpoint-every 0 --json)
quality() { # name args...
  local name=$1; shift
  rm -rf "$OUT/ad-$name"
  echo "quality: $name ($QSTEPS steps)" >&2
  "$E" tune "${common[@]}" --data $DATA/train.txt --valid $DATA/valid.txt --valid-ctx 256 \
    --valid-chunks 40 --steps "$QSTEPS" -o "$OUT/ad-$name" "$@" > "$OUT/$name.jsonl" 2> /dev/null
}
speed() { # name steps cached-steps args...: fresh samples, then (cached-steps > 0) 2 samples
  local name=$1 steps=$2 csteps=$3; shift 3
  echo "speed: $name" >&2
  rm -rf "$OUT/ad-speed-$name" "$OUT/ad-cached-$name"
  "$E" tune "${common[@]}" --data $DATA/train.txt --steps "$steps" -o "$OUT/ad-speed-$name" "$@" \
    > "$OUT/speed-$name.jsonl" 2> /dev/null
  if [ "$csteps" -gt 0 ]; then
    "$E" tune "${common[@]}" --data $DATA/train.txt --max-samples 2 --steps "$csteps" \
      -o "$OUT/ad-cached-$name" "$@" > "$OUT/cached-$name.jsonl" 2> /dev/null
  fi
}
if [ "$PARTS" != speed ]; then
  "$E" eval -m "$MODEL" --text $DATA/valid.txt --ctx 256 --chunks 40 --threads "$THREADS" --json > "$OUT/valid-base.json"
  quality full --mode full
  for s in $STRIDES; do quality "edge-s$s" --mode edge --stride "$s"; done
fi
if [ "$PARTS" != quality ]; then
  for r in $(seq 1 "$ROUNDS"); do
    speed "full-r$r" 12 0 --mode full
    # 6 steps a phase on fresh samples; 8 a phase on 2 samples, 6 of which read the cache.
    for s in $STRIDES; do speed "edge-s$s-r$r" $((6 * 30 / s)) $((8 * 30 / s)) --mode edge --stride "$s"; done
  done
fi
python3 scripts/tune-stride-sweep-summarize.py "$OUT" $STRIDES
