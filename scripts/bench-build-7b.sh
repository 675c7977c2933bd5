#!/usr/bin/env bash
# Peak memory of `edgec build` on a model of LLaMA-7B's shapes (hidden 4096, intermediate
# 11008, 32 layers, 32 heads, 32 KV heads, vocabulary 32000; f16, 13.5 GB) with small random
# weights, generated into a temporary directory by `compiler/examples/synth_llama.rs`,
# compressed by a uniform 4-bit group-32 asymmetric round-to-nearest policy for target
# `host`. Reports peak RSS (`/usr/bin/time -v`), the model's and the bundle's bytes and the
# seconds, then `edgec verify`s the bundle. Everything generated is deleted on exit.
#
#   scripts/bench-build-7b.sh            # streamed build (the default path)
#   WHOLE=1 scripts/bench-build-7b.sh    # also the whole-graph build (--no-stream)
#   BENCH_DIR=/some/dir scripts/bench-build-7b.sh
#
# POLICY=gptq: a calibrated policy instead, GPTQ (4-bit g32 asym) on the even layers and
# SparseGPT 2:4 + GPTQ on the odd ones among the first CALIB_LAYERS (default 2), 4-bit
# round-to-nearest on the rest, with 4 samples of 128 tokens (SAMPLES, SEQ) of
# data/austen/train.txt as calibration. The synthetic model has no tokenizer, so the
# calibration file is the text's bytes as token ids. Every layer still takes the
# calibration's hidden states through the compressed layers before it (the streamed
# build carries them from layer to layer). LAYERS=N generates an N-layer model instead of 32.
#
# Needs 30 GB free where BENCH_DIR is (13.5 GB model + 3.6 GB bundle, with room to spare
# for other users of the disk); refuses to start otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${BENCH_DIR:-/tmp/bench-build-7b}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
free_gb=$(df -BG --output=avail "$WORK" | tail -1 | tr -dc 0-9)
if [ "$free_gb" -lt 30 ]; then
    echo "bench-build-7b: only ${free_gb} GB free at $WORK, 30 GB needed" >&2
    exit 1
fi

cargo build --release -q -p edgec --bin edgec --example synth_llama
BIN=target/release

t0=$(date +%s.%N)
layers=${LAYERS:-32}
"$BIN/examples/synth_llama" "$WORK/model" --layers "$layers"
t1=$(date +%s.%N)
echo "generated in $(echo "$t1 - $t0" | bc) s"

calib_layers=0
calib_args=()
if [ "${POLICY:-rtn}" = gptq ]; then
    calib_layers=${CALIB_LAYERS:-2}
    # The text's bytes as token ids (the synthetic vocabulary has 32000).
    python3 -c 'import sys; print(" ".join(map(str, open(sys.argv[1], "rb").read(200000))))' \
        data/austen/train.txt > "$WORK/calib.ids"
    calib_args=(--calib "$WORK/calib.ids" --samples "${SAMPLES:-4}" --seq "${SEQ:-128}")
fi
{
    printf 'model = "synth-llama-7b"\nmethod = "uniform"\nbudget = "bits=4"\n'
    for ((i = 0; i < layers; i++)); do
        sparsity=0.0 pattern=unstructured quantizer=rtn pruner=magnitude
        if [ "$i" -lt "$calib_layers" ]; then
            quantizer=gptq
            if [ $((i % 2)) = 1 ]; then sparsity=0.5 pattern=2:4 pruner=sparsegpt; fi
        fi
        printf '\n[[layer]]\nindex = %d\nbits = 4\ngroup = 32\nscheme = "asym"\nsparsity = %s\n' "$i" "$sparsity"
        printf 'pattern = "%s"\nquantizer = "%s"\npruner = "%s"\n' "$pattern" "$quantizer" "$pruner"
    done
} > "$WORK/policy.toml"
"$BIN/edgec" keygen -o "$WORK/key" > /dev/null

# One build: prints peak RSS, seconds, bundle bytes; removes the bundle unless it is kept.
run_build() {
    local tag=$1
    shift
    /usr/bin/time -v "$BIN/edgec" build --model "$WORK/model" --policy "$WORK/policy.toml" \
        --target host --sign-key "$WORK/key" -o "$WORK/$tag.edgeb" --json "${calib_args[@]}" "$@" \
        > "$WORK/$tag.json" 2> "$WORK/$tag.time"
    local rss_kb secs size streamed
    rss_kb=$(grep 'Maximum resident set size' "$WORK/$tag.time" | tr -dc 0-9)
    secs=$(grep 'Elapsed (wall clock)' "$WORK/$tag.time" | awk '{print $NF}')
    size=$(stat -c %s "$WORK/$tag.edgeb")
    streamed=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bundles"][0]["streamed_build"])' "$WORK/$tag.json")
    echo "$tag: peak RSS $((rss_kb / 1024)) MiB ($rss_kb kB), wall $secs, bundle $size bytes, streamed $streamed"
}

model_bytes=$(stat -c %s "$WORK/model/model.safetensors")
echo "model: $model_bytes bytes ($((model_bytes / 1048576)) MiB)"
echo "command: /usr/bin/time -v edgec build --model MODEL --policy policy.toml --target host --sign-key key -o OUT.edgeb --json ${calib_args[*]}"
run_build streamed
/usr/bin/time -f "verify: %e s, peak RSS %M kB" "$BIN/edgec" verify --bundle "$WORK/streamed.edgeb" \
    --trusted-key "$WORK/key.pub" > /dev/null
if [ "${WHOLE:-0}" = 1 ]; then
    rm -f "$WORK/streamed.edgeb"
    run_build whole --no-stream
fi
