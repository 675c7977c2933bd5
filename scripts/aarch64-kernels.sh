#!/usr/bin/env bash
# The aarch64 kernel check: generated kernels compiled for aarch64 by Cranelift, linked
# with a C harness by Debian's cross compiler and run under qemu-user, against the Rust
# reference kernels' outputs. Installs gcc-aarch64-linux-gnu and qemu-user with apt-get
# when they are missing (Debian 12, as root).
#
# Usage: scripts/aarch64-kernels.sh [WORK_DIR]   (default: target/aarch64-kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-target/aarch64-kernels}"

need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if ((${#need[@]})); then
    echo "installing ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: ${need[*]} missing and not root; install them with apt-get" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

rm -rf "$work"
mkdir -p "$work"
for features in "" "has_dotprod"; do
    dir="$work/${features:-base}"
    # shellcheck disable=SC2086
    cargo run -q -p edgec --example aarch64_kernels -- "$dir" $features
    aarch64-linux-gnu-gcc -static -O1 -I tests/aarch64 -o "$dir/harness" \
        tests/aarch64/harness.c "$dir/table.c" "$dir/kernels.o" -lm
    cpu=max
    echo "aarch64 kernels (${features:-no extra features}) under qemu-aarch64 -cpu $cpu:"
    qemu-aarch64 -cpu "$cpu" "$dir/harness" "$dir"
done
