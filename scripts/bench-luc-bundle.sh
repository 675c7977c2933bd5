#!/usr/bin/env bash
# A LUC-policy bundle of SmolLM2 against the compressed model it comes from, and its decode
# speed beside llama.cpp Q4_0 (docs/benchmarks.md, "LUC-policy bundles through the JIT
# kernels"):
#   scripts/bench-luc-bundle.sh TAG POLICY.toml        # OUT=target/bench-luc-bundle ROUNDS=3
# edgec compress + edgec eval (first 8 chunks of test.txt, ctx 512); edgec build --target host
# with the same policy and calibration; edge-runtime eval of the bundle with the JIT and the
# reference kernels; then ROUNDS x (edge-runtime generate -n 128, one thread; llama-bench
# tg128 of Q4_0 made by llama-quantize from the F16 GGUF), interleaved. Needs llama.cpp's
# binaries (LLAMA_BIN, default /tmp/llamacpp/bin; see the llama.cpp peer's install script).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=$1; P=$2
OUT=${OUT:-target/bench-luc-bundle}; ROUNDS=${ROUNDS:-3}; LLAMA_BIN=${LLAMA_BIN:-/tmp/llamacpp/bin}
mkdir -p "$OUT"
cargo build --release --bins
E=target/release/edgec; R=target/release/edge-runtime; D=data/austen
M=$(scripts/fetch-model.sh)
F16=$(dirname "$M")/SmolLM2-135M-Instruct.F16.gguf
[ -f "$OUT/k" ] || $E keygen -o "$OUT/k"
[ -f "$OUT/q4_0.gguf" ] || "$LLAMA_BIN/llama-quantize" "$F16" "$OUT/q4_0.gguf" Q4_0 > /dev/null 2>&1
$E compress -m "$M" --policy "$P" --calib $D/train.txt --samples 8 --seq 512 -o "$OUT/c-$tag" --json > "$OUT/$tag.compress.json"
$E eval --model "$OUT/c-$tag" --text $D/test.txt --ctx 512 --chunks 8 --json > "$OUT/$tag.edgec-eval.json"
/usr/bin/time -v $E build --model "$M" --policy "$P" --calib $D/train.txt --samples 8 --seq 512 --target host \
  --sign-key "$OUT/k" -o "$OUT/$tag.edgeb" --json > "$OUT/$tag.build.json" 2> "$OUT/$tag.build.err"
for k in jit reference; do
  $R eval --bundle "$OUT/$tag.edgeb" --trusted-key "$OUT/k.pub" --text $D/test.txt --ctx 512 --chunks 8 \
    --kernels $k --json > "$OUT/$tag.rt-eval-$k.json"
done
for i in $(seq "$ROUNDS"); do
  $R generate --bundle "$OUT/$tag.edgeb" --trusted-key "$OUT/k.pub" --prompt "The history of the English novel" \
    -n 128 --threads 1 --json > "$OUT/$tag.gen-$i.json"
  "$LLAMA_BIN/llama-bench" -m "$OUT/q4_0.gguf" -p 0 -n 128 -t 1 -r 1 -o json > "$OUT/q4_0-$tag-$i.json" 2> /dev/null
done
rm -rf "$OUT/c-$tag" "$OUT/$tag.edgeb"
python3 - "$OUT" "$tag" <<'PY'
import glob, json, statistics, sys
out, t = sys.argv[1:]
e = json.load(open(f"{out}/{t}.edgec-eval.json"))["loss"]
j = json.load(open(f"{out}/{t}.rt-eval-jit.json"))["loss"]
r = json.load(open(f"{out}/{t}.rt-eval-reference.json"))["loss"]
g = statistics.median(json.load(open(f))["decode_tokens_per_s"] for f in glob.glob(f"{out}/{t}.gen-*.json"))
q = statistics.median(json.load(open(f))[0]["avg_ts"] for f in glob.glob(f"{out}/q4_0-{t}-*.json"))
print(f"{t}: edgec eval {e:.10f}  bundle jit {j:.10f} ({abs(j-e)/e:.1e})  reference {r:.10f} ({abs(r-e)/e:.1e})")
print(f"{t}: decode {g:.1f} tok/s (JIT, 1 thread) vs llama.cpp Q4_0 tg128 {q:.1f}: {g/q:.2f}x")
PY
