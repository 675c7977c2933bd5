#!/usr/bin/env python3
"""Summarizes scripts/bench-vs-llamacpp.sh output: medians of all samples per side,
variant and thread count, and the Edge-LLM / llama.cpp ratio."""
import glob, json, os, re, statistics, sys

out = sys.argv[1] if len(sys.argv) > 1 else "bench-out"
rows = {}

def add(key, side, test, samples):
    rows.setdefault(key, {}).setdefault((side, test), []).extend(samples)

for f in glob.glob(os.path.join(out, "llamacpp-*-t*-r*.json")):
    v, t = re.search(r"llamacpp-(.+)-t(\d)-r\d\.json", f).groups()
    for r in json.load(open(f)):
        test = "pp" if r["n_prompt"] > 0 else "tg"
        add((v, int(t)), "llama.cpp", test, r["samples_ts"])
for f in glob.glob(os.path.join(out, "edgec-*-t*-r*.json")):
    v, t = re.search(r"edgec-(.+)-t(\d)-r\d\.json", f).groups()
    r = json.load(open(f))
    add((v, int(t)), "edge-llm", "pp", r["prefill_samples"])
    add((v, int(t)), "edge-llm", "tg", r["decode_samples"])

def rss(path):
    try:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read())
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None

print("| weights | threads | pp512 edge-llm | pp512 llama.cpp | ratio | tg128 edge-llm | tg128 llama.cpp | ratio | n |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for (v, t) in sorted(rows):
    r = rows[(v, t)]
    med = lambda k: statistics.median(r[k]) if r.get(k) else float("nan")
    epp, lpp, etg, ltg = med(("edge-llm", "pp")), med(("llama.cpp", "pp")), med(("edge-llm", "tg")), med(("llama.cpp", "tg"))
    n = len(r.get(("edge-llm", "pp"), []))
    print(f"| {v} | {t} | {epp:.1f} | {lpp:.1f} | {epp/lpp:.2f} | {etg:.1f} | {ltg:.1f} | {etg/ltg:.2f} | {n} |")
print()
print("| weights | peak RSS edge-llm bench (MiB) | peak RSS llama-bench tg128 (MiB) |")
print("|---|---:|---:|")
for v in sorted({k[0] for k in rows}):
    e = [rss(p) for p in glob.glob(os.path.join(out, f"edgec-{v}-t2-r*.time"))]
    l = [rss(p) for p in glob.glob(os.path.join(out, f"llamacpp-{v}-mem.time"))]
    e = [x for x in e if x]; l = [x for x in l if x]
    print(f"| {v} | {max(e) if e else float('nan'):.0f} | {max(l) if l else float('nan'):.0f} |")
