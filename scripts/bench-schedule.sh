#!/usr/bin/env bash
# The scheduling pass against this machine, on SmolLM2-135M-Instruct (F16 GGUF):
#  1. cost model: `edgec inspect --schedule --target host --measure` times every op of a
#     decode step (1 token after 511 cached positions) and of a 128-token prefill, and
#     prints predicted vs measured per op kind, Spearman rank correlation and total error;
#  2. memory: `edgec build --memory-budget $BUDGET --ctx $CTX` (the plan streams weights) and
#     a bundle without a budget; peak RSS (/usr/bin/time -v) of `edge-runtime eval` (ctx
#     $CTX on the first 20 kB of data/austen/valid.txt) and `edge-runtime generate` (32
#     tokens) on both, with the loss (it must not change) and decode speed. The runtime
#     follows each bundle's whole plan (streamed weights, arena and order, tiles and
#     threads); the budgeted bundle also runs with `--follow residency` (streamed weights
#     only, every value allocated, the kernels' default tiles) for comparison.
# Results go to $OUT (JSON and logs) and a summary to stdout; the bundles are deleted at
# the end (KEEP_BUNDLES=1 keeps them). COST=0 skips part 1.
#
#   scripts/bench-schedule.sh        # MODEL=~/.cache/edge-llm/models/SmolLM2-135M-Instruct.F16.gguf
#                                    # BUDGET=150MB CTX=128 REPS=9 OUT=target/bench-schedule COST=1
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-$HOME/.cache/edge-llm/models/SmolLM2-135M-Instruct.F16.gguf}
BUDGET=${BUDGET:-150MB}
CTX=${CTX:-128}
REPS=${REPS:-9}
OUT=${OUT:-target/bench-schedule}
COST=${COST:-1}
if [ ! -f "$MODEL" ]; then
  echo "bench-schedule: $MODEL is missing; set MODEL to SmolLM2-135M-Instruct's F16 GGUF" >&2
  echo "  (llama.cpp: convert_hf_to_gguf.py --outtype f16 on HuggingFaceTB/SmolLM2-135M-Instruct)" >&2
  exit 1
fi
mkdir -p "$OUT"
cargo build -q --release -p edgec -p edge-runtime --bins
EDGEC=target/release/edgec
RT=target/release/edge-runtime
echo "load: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"

[ "$COST" = 1 ] && echo "== cost model vs this machine (target host) =="
[ "$COST" = 1 ] && for w in "decode:--rows 1 --past 511" "prefill:--rows 128 --past 0"; do
  name=${w%%:*}
  # shellcheck disable=SC2086
  "$EDGEC" inspect "$MODEL" --schedule --target host --ctx 512 ${w#*:} --measure --reps "$REPS" --json \
    >"$OUT/cost-$name.json"
  python3 - "$OUT/cost-$name.json" "$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["measured"]["comparison"]
print(f"{sys.argv[2]}: {d['workload']['rows']} rows after {d['workload']['past']}")
print(f"  {'op':<12}{'predicted ms':>14}{'measured ms':>14}{'ratio':>8}")
for k, p, m in d["kinds"]:
    print(f"  {k:<12}{p*1e3:>14.3f}{m*1e3:>14.3f}{p/m:>8.2f}")
print(f"  step: predicted {d['predicted_seconds']*1e3:.2f} ms, measured {d['measured_step_seconds']*1e3:.2f} ms, "
      f"total error {d['total_error']*100:+.1f}%; Spearman {d['spearman_kinds']:.3f} (op kinds), "
      f"{d['spearman_nodes']:.3f} (ops)")
PY
done

echo "== memory budget $BUDGET, ctx $CTX =="
head -c 20000 data/austen/valid.txt >"$OUT/eval.txt"
"$EDGEC" build -m "$MODEL" --target host --unsigned --ctx "$CTX" -o "$OUT/full.edgeb" --json >"$OUT/build-full.json"
"$EDGEC" build -m "$MODEL" --target host --unsigned --ctx "$CTX" --memory-budget "$BUDGET" -o "$OUT/budget.edgeb" \
  --json >"$OUT/build-budget.json"
for run in full:all budget:all budget:residency; do
  b=${run%%:*} follow=${run#*:} tag=${run/:/-}
  /usr/bin/time -v "$RT" eval --bundle "$OUT/$b.edgeb" --allow-unsigned --follow "$follow" --text "$OUT/eval.txt" \
    --ctx "$CTX" --json >"$OUT/eval-$tag.json" 2>"$OUT/eval-$tag.time"
  /usr/bin/time -v "$RT" generate --bundle "$OUT/$b.edgeb" --allow-unsigned --follow "$follow" \
    --prompt "The capital of France is" -n 32 --ignore-eos --json >"$OUT/gen-$tag.json" 2>"$OUT/gen-$tag.time"
done
[ "${KEEP_BUNDLES:-0}" = 1 ] || rm -f "$OUT/full.edgeb" "$OUT/budget.edgeb"
python3 - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
def rss(f):
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f).read()).group(1)) * 1024
def wall(f):
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", open(f).read())
    return int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
print(f"  {'bundle':<8}{'follows':<10}{'budget MB':>10}{'plan MB':>9}{'streamed':>9}{'eval RSS MB':>12}{'eval s':>8}"
      f"{'loss':>10}{'gen RSS MB':>11}{'tok/s':>7}")
for b, follow in [("full", "all"), ("budget", "all"), ("budget", "residency")]:
    tag = f"{b}-{follow}"
    bu = json.load(open(f"{out}/build-{b}.json"))["bundles"][0]
    ev = json.load(open(f"{out}/eval-{tag}.json"))
    ge = json.load(open(f"{out}/gen-{tag}.json"))
    tps = ge.get("decode_tokens_per_s", float("nan"))
    print(f"  {b:<8}{follow:<10}{bu['budget_bytes']/1e6:>10.1f}{bu['planned_bytes']/1e6:>9.1f}{bu['streamed_weights']:>9}"
          f"{rss(f'{out}/eval-{tag}.time')/1e6:>12.1f}{wall(f'{out}/eval-{tag}.time'):>8.1f}{ev['loss']:>10.5f}"
          f"{rss(f'{out}/gen-{tag}.time')/1e6:>11.1f}{tps:>7.1f}")
PY
