#!/usr/bin/env bash
# Benchmarks of the device service on SmolLM2-135M (docs/benchmarks.md, "Device service"):
#   1. Generate overhead per token: `edgec remote-generate` over loopback gRPC against a local
#      `edge-runtime generate` of the same bundle (same tokens), RUNS runs each, interleaved;
#   2. throughput of 64 concurrent Generate streams (64 client processes) against one stream;
#   3. a device tune (`edgec tune --device`), then self-speculative decoding with the tuned
#      model: accepted draft length and decode speed against plain greedy decoding.
# Release binaries; figures are medians. Usage: scripts/bench-service.sh  (RUNS=3 N=64 K="2 4"
# LAYERS="5 11" STEPS=30 PARTS="overhead streams spec" to change; each part keeps its results in
# $WORK/results-PART.jsonl and the summary reads all of them). No network once the model is cached.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
N=${N:-64}
STREAMS=${STREAMS:-64}
STREAM_TOKENS=${STREAM_TOKENS:-32}
K=${K:-"2 4"}
LAYERS=${LAYERS:-"5 11"}
STEPS=${STEPS:-30}
WORK=${WORK:-target/bench-service}
PROMPT=${PROMPT:-"The history of the English novel"}
EDGEC=target/release/edgec
RUNTIME=target/release/edge-runtime

[ -x "$EDGEC" ] && [ -x "$RUNTIME" ] || cargo build --release --bins
MODEL=${MODEL:-$(scripts/fetch-model.sh)}
mkdir -p "$WORK"
PARTS=${PARTS:-"overhead streams spec"}
part() { [[ " $PARTS " == *" $1 "* ]] && RESULTS="$WORK/results-$1.jsonl" && : > "$RESULTS"; }

if [ ! -f "$WORK/smol.edgeb" ]; then
  $EDGEC keygen -o "$WORK/key" --force
  $EDGEC build -m "$MODEL" --dtype f16 --target host --sign-key "$WORK/key" -o "$WORK/smol.edgeb"
fi
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/token"
rm -rf "$WORK/device"
$RUNTIME serve --listen 127.0.0.1:0 --data-dir "$WORK/device" --trusted-key "$WORK/key.pub" \
  --token-file "$WORK/token" --max-streams 128 > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q "^listening on" "$WORK/serve.log" && break; sleep 0.2; done
DEVICE="http://$(sed -n 's/^listening on //p' "$WORK/serve.log" | head -1)"
DEV=(--device "$DEVICE" --token-file "$WORK/token")
t0=$(date +%s.%N)
$EDGEC deploy --bundle "$WORK/smol.edgeb" "${DEV[@]}" --json > "$WORK/deploy.json"
t1=$(date +%s.%N)
# Every run of the script deploys once to a fresh device; these records accumulate across runs.
python3 -c "import json,sys; print(json.dumps({'bench': 'deploy', 'seconds': $t1 - $t0, 'bytes': $(stat -c %s "$WORK/smol.edgeb")}))" \
  >> "$WORK/results-deploy.jsonl"

record() { # name json
  python3 -c 'import json,sys; d=json.loads(sys.argv[2]); d["bench"]=sys.argv[1]; print(json.dumps(d))' "$1" "$2" >> "$RESULTS"
}

if part overhead; then
echo "== Generate overhead: $RUNS runs x $N tokens, local and remote interleaved" >&2
for r in $(seq "$RUNS"); do
  record local "$($RUNTIME generate --bundle "$WORK/smol.edgeb" --trusted-key "$WORK/key.pub" \
    --prompt "$PROMPT" -n "$N" --ignore-eos --json)"
  record remote "$($EDGEC remote-generate "${DEV[@]}" -p "$PROMPT" -n "$N" --ignore-eos --json)"
done
fi

if part streams; then
echo "== $STREAMS concurrent streams x $STREAM_TOKENS tokens" >&2
for r in $(seq "$RUNS"); do
  t0=$(date +%s.%N)
  $EDGEC remote-generate "${DEV[@]}" -p "$PROMPT" -n "$STREAM_TOKENS" --ignore-eos --json > "$WORK/one.json"
  t1=$(date +%s.%N)
  record one_stream "{\"seconds\": $(python3 -c "print($t1 - $t0)"), \"tokens\": $STREAM_TOKENS}"
  pids=()
  for i in $(seq "$STREAMS"); do
    $EDGEC remote-generate "${DEV[@]}" -p "$PROMPT" -n "$STREAM_TOKENS" --ignore-eos --json \
      > "$WORK/stream-$i.json" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  t2=$(date +%s.%N)
  same=$(python3 - "$WORK" "$STREAMS" <<'EOF'
import json, sys
w, n = sys.argv[1], int(sys.argv[2])
one = json.load(open(f"{w}/one.json"))["tokens"]
print(sum(json.load(open(f"{w}/stream-{i}.json"))["tokens"] == one for i in range(1, n + 1)))
EOF
)
  record streams "{\"seconds\": $(python3 -c "print($t2 - $t1)"), \"tokens\": $((STREAMS * STREAM_TOKENS)), \"same_as_one\": $same}"
done
fi

if part spec; then
echo "== device tune ($STEPS steps) and self-speculative decoding" >&2
$EDGEC tune "${DEV[@]}" --data data/austen/train.txt --steps "$STEPS" --seq 256 --stride 6 --json \
  > "$WORK/tune.jsonl"
JOB=$(tail -1 "$WORK/tune.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
record tune "$(tail -1 "$WORK/tune.jsonl")"
for r in $(seq "$RUNS"); do
  record plain "$($EDGEC remote-generate "${DEV[@]}" -p "$PROMPT" -n "$N" --ignore-eos --tune-job "$JOB" --json)"
  for layer in $LAYERS; do
    for k in $K; do
      record "spec_l${layer}_k${k}" "$($EDGEC remote-generate "${DEV[@]}" -p "$PROMPT" -n "$N" --ignore-eos \
        --tune-job "$JOB" --draft-tokens "$k" --draft-layer "$layer" --json)"
    done
  done
done
fi

python3 - "$WORK" <<'EOF'
import glob, json, statistics, sys
rows = [json.loads(l) for f in sorted(glob.glob(f"{sys.argv[1]}/results-*.jsonl")) for l in open(f)]
by = {}
for r in rows:
    by.setdefault(r["bench"], []).append(r)
med = statistics.median
tps = lambda b, key="decode_tokens_per_s": med([r.get(key) or r["decode_tokens_per_s"] for r in by[b]])
runs = lambda b, key="decode_tokens_per_s": [round(r.get(key) or r["decode_tokens_per_s"], 2) for r in by[b]]
print(f"load average at the end: {open('/proc/loadavg').read().split()[0]}")
if "deploy" in by:
    mbs = [r["bytes"] / r["seconds"] / 1e6 for r in by["deploy"]]
    print(f"deploy over loopback           {med(mbs):8.1f} MB/s  runs {[round(x, 1) for x in mbs]}")
if "local" in by:
    loc, rem, dev = tps("local"), tps("remote", "client_decode_tokens_per_s"), tps("remote")
    print(f"local edge-runtime generate    {loc:8.2f} tokens/s  runs {runs('local')}")
    print(f"remote, seen by the client     {rem:8.2f} tokens/s  runs {runs('remote', 'client_decode_tokens_per_s')}")
    print(f"remote, measured on the device {dev:8.2f} tokens/s  runs {runs('remote')}")
    print(f"overhead per token (client)    {100 * (loc / rem - 1):+7.2f} %")
    same = all(r["tokens"] == by["local"][0]["tokens"] for r in by["local"] + by["remote"])
    print(f"same tokens local/remote       {same}")
if "streams" in by:
    one = med([r["tokens"] / r["seconds"] for r in by["one_stream"]])
    agg = med([r["tokens"] / r["seconds"] for r in by["streams"]])
    print(f"one stream (wall, with client start)  {one:8.2f} tokens/s")
    print(f"64 streams aggregate (wall)           {agg:8.2f} tokens/s; streams equal to the single one: {[r['same_as_one'] for r in by['streams']]}")
if "tune" in by:
    t = by["tune"][0]
    print(f"device tune: job {t['job_id']}, {t['steps']} steps in {t['seconds']:.1f} s")
    plain = tps("plain")
    print(f"tuned plain greedy           {plain:8.2f} tokens/s  runs {runs('plain')}")
    for b in sorted(k for k in by if k.startswith("spec_")):
        rs = by[b]
        acc = med([r["accepted_draft_tokens"] / max(r["speculative_rounds"], 1) for r in rs])
        rate = med([r["accepted_draft_tokens"] / max(r["draft_tokens"], 1) for r in rs])
        same = all(r["tokens"] == by["plain"][0]["tokens"] for r in rs)
        print(f"{b:<16} {tps(b):8.2f} tokens/s  speed-up {tps(b) / plain:5.2f}x  accepted/round {acc:4.2f}  acceptance {100 * rate:5.1f} %  same tokens as plain: {same}")
EOF
