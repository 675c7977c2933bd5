#!/usr/bin/env bash
# CI: build a signed bundle of the tiny-llama fixture for every target in targets/, verify
# each, run the host one with edge-runtime and check that its loss equals `edgec eval` of
# the same model (relative 1e-4), with and without a LUC policy; check that edge-runtime
# refuses an unsigned bundle and a bundle for another instruction set.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p edgec -p edge-runtime --bins
EDGEC=target/debug/edgec
RUNTIME=target/debug/edge-runtime
FIXTURE=tests/fixtures/tiny-llama
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$EDGEC" keygen -o "$WORK/key" >/dev/null
# Token sequences (ids < the fixture's vocabulary of 256).
printf '1 17 204 9 33 250 4 81 120 7 66 3 199 42 5 18\n1 90 91 92 13 200 201 7 7 7 150 2\n' >"$WORK/tokens.txt"
# A policy: 4-bit layers and 2:4-sparse 8-bit layers, round to nearest.
{
  printf 'model = "tiny-llama"\nmethod = "uniform"\nbudget = "bits=6"\n'
  for i in 0 1 2 3; do
    if [ $((i % 2)) -eq 0 ]; then b=4 s=0.0 p=unstructured; else b=8 s=0.5 p=2:4; fi
    printf '\n[[layer]]\nindex = %d\nbits = %d\ngroup = 32\nscheme = "asym"\nsparsity = %s\npattern = "%s"\nquantizer = "rtn"\npruner = "magnitude"\n' "$i" "$b" "$s" "$p"
  done
} >"$WORK/policy.toml"

targets=()
for f in targets/*.toml; do
  targets+=(--target "$(basename "$f" .toml)")
done
# Every target, with the policy (so each bundle's kernel table is compiled for its ISA).
"$EDGEC" build --model "$FIXTURE" --policy "$WORK/policy.toml" "${targets[@]}" --sign-key "$WORK/key" -o "$WORK/bundles"
for f in targets/*.toml; do
  name=$(basename "$f" .toml)
  "$EDGEC" verify --bundle "$WORK/bundles/$name.edgeb" --trusted-key "$WORK/key.pub" >/dev/null
  echo "verified $name.edgeb"
done

loss() { sed -e 's/.*"loss":\([-0-9.eE+]*\).*/\1/'; }
same_loss() { # name, want, got
  awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN {
    d = (a - b) / a; if (d < 0) d = -d
    printf "%s: edgec eval %s, edge-runtime eval %s (relative difference %.2e)\n", n, a, b, d
    exit !(d <= 1e-4) }'
}
runtime_loss() { # bundle, kernels
  "$RUNTIME" eval --bundle "$1" --trusted-key "$WORK/key.pub" --kernels "$2" --tokens "$WORK/tokens.txt" --json | loss
}

# The host bundle with the policy against `edgec compress` + `edgec eval`, through the
# reference kernels and through the JIT-compiled kernel table.
"$EDGEC" compress --model "$FIXTURE" --policy "$WORK/policy.toml" -o "$WORK/compressed" >/dev/null
want=$("$EDGEC" eval --model "$WORK/compressed" --tokens "$WORK/tokens.txt" --json | loss)
same_loss "host bundle with policy, reference kernels" "$want" "$(runtime_loss "$WORK/bundles/host.edgeb" reference)"
same_loss "host bundle with policy, JIT kernels" "$want" "$(runtime_loss "$WORK/bundles/host.edgeb" jit)"

# Without a policy: the weights as in the model.
"$EDGEC" build --model "$FIXTURE" --target host --sign-key "$WORK/key" -o "$WORK/plain.edgeb" >/dev/null
want=$("$EDGEC" eval --model "$FIXTURE" --tokens "$WORK/tokens.txt" --json | loss)
same_loss "host bundle" "$want" "$(runtime_loss "$WORK/plain.edgeb" jit)"

# Refusals.
"$EDGEC" build --model "$FIXTURE" --target host --unsigned -o "$WORK/unsigned.edgeb" >/dev/null
if "$RUNTIME" eval --bundle "$WORK/unsigned.edgeb" --trusted-key "$WORK/key.pub" --tokens "$WORK/tokens.txt" 2>"$WORK/err"; then
  echo "an unsigned bundle was run" >&2; exit 1
fi
grep -q "not signed" "$WORK/err" || { cat "$WORK/err" >&2; exit 1; }
echo "unsigned bundle refused: $(cat "$WORK/err")"
case "$(uname -m)" in x86_64) foreign=raspberry-pi-5 ;; *) foreign=x86-64-avx2 ;; esac
if "$RUNTIME" eval --bundle "$WORK/bundles/$foreign.edgeb" --trusted-key "$WORK/key.pub" --tokens "$WORK/tokens.txt" 2>"$WORK/err"; then
  echo "a bundle for another instruction set was run" >&2; exit 1
fi
grep -q "this machine is" "$WORK/err" || { cat "$WORK/err" >&2; exit 1; }
echo "foreign bundle refused: $(cat "$WORK/err")"
echo "bundles: $((${#targets[@]} / 2)) targets built and verified, host bundle runs"
