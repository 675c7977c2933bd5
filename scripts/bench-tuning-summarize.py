#!/usr/bin/env python3
"""Table of scripts/bench-tuning.sh results: medians over rounds of each run's median step."""
import glob
import json
import os
import re
import statistics
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "target/bench-tuning"


def max_rss(time_file):
    try:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(time_file).read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def edgec_run(path, skip=0):
    steps, summary = [], None
    for line in open(path):
        d = json.loads(line)
        if "step" in d and "exit" in d:
            steps.append(d)
        else:
            summary = d
    return steps[skip:], summary


rows = {}
for f in sorted(glob.glob(f"{out}/peft-full-r*.json")):
    d = json.loads(open(f).read().strip().splitlines()[-1])
    rows.setdefault("PyTorch+PEFT full", []).append(
        (d["seconds_per_step"], d["peak_rss_bytes"], d["peak_rss_bytes"] - d["rss_after_load_bytes"], None))
per_exit = {}
for kind in ["full", "edge", "edge-epochs", "edge-recompute"]:
    for f in sorted(g for g in glob.glob(f"{out}/edgec-{kind}-r*.jsonl") if re.fullmatch(rf"edgec-{kind}-r\d+\.jsonl", os.path.basename(g))):
        steps, s = edgec_run(f, skip=3 if kind == "full" else 0)
        sec = statistics.median(x["seconds"] for x in steps)
        rows.setdefault(f"edgec {kind}", []).append(
            (sec, s["peak_rss_bytes"], s["peak_rss_bytes"] - s["rss_after_load_bytes"], s.get("tuning_heap_peak_bytes")))
        if kind.startswith("edge"):
            for e in sorted({x["exit"] for x in steps}):
                per_exit.setdefault((kind, e), []).append(statistics.median(x["seconds"] for x in steps if x["exit"] == e))
for f in sorted(glob.glob(f"{out}/luc4-*.jsonl")):
    kind = os.path.basename(f)[:-6]
    steps, s = edgec_run(f, skip=3 if kind.endswith("full") else 0)
    rows.setdefault(f"edgec {kind} (4-bit LUC model)", []).append(
        (statistics.median(x["seconds"] for x in steps), s["peak_rss_bytes"], s["peak_rss_bytes"] - s["rss_after_load_bytes"],
         s.get("tuning_heap_peak_bytes")))

MiB = 1 << 20
nan4 = [(float("nan"),) * 4]
ref = statistics.median(r[0] for r in rows.get("edgec full", nan4))
refpeak = statistics.median(r[1] for r in rows.get("edgec full", nan4))
refheap = statistics.median(r[3] for r in rows.get("edgec full", nan4))
print("| run | rounds | s/step (median) | tokens/s | speed vs edgec full | peak RSS MiB (with weights) | vs edgec full | peak - loaded RSS MiB | tuning heap peak MiB (without weights) | vs edgec full |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, rs in rows.items():
    sec = statistics.median(r[0] for r in rs)
    peak = statistics.median(r[1] for r in rs)
    tun = statistics.median(r[2] for r in rs)
    heaps = [r[3] for r in rs if r[3] is not None]
    heap = statistics.median(heaps) if heaps else None
    hs = f"{heap / MiB:.0f} | {refheap / heap:.2f}x less" if heap else "- | -"
    print(f"| {name} | {len(rs)} | {sec:.3f} | {256 / sec:.0f} | {ref / sec:.2f}x | {peak / MiB:.0f} | {refpeak / peak:.2f}x less | {tun / MiB:.0f} | {hs} |")
if per_exit:
    print()
    print("| edge run | exit | window | s/step (median over rounds) |")
    print("|---|---:|---|---:|")
    for (kind, e), v in sorted(per_exit.items()):
        print(f"| {kind} | {e} | {e - 5}..{e} | {statistics.median(v):.3f} |")
base = f"{out}/valid-base.json"
if os.path.exists(base):
    b = json.load(open(base))
    print()
    print(f"Validation perplexity before tuning (valid.txt, ctx 256, {b.get('chunks')} chunks): {b['perplexity']:.3f}")
    print()
    print("| mode | tokens trained | s/step | last | max-confidence | mean | weighted |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in ["full", "edge"]:
        f = f"{out}/quality-{mode}.jsonl"
        if not os.path.exists(f):
            continue
        steps, s = edgec_run(f)
        v = s.get("valid_perplexity") or {}
        cells = " | ".join(f"{v[k]:.3f}" if k in v else "-" for k in ["last", "max-confidence", "mean", "weighted"])
        print(f"| {mode} | {s['steps_run'] * 256} | {s['seconds_per_step']:.3f} | {cells} |")
        pe = s.get("valid_perplexity_per_exit") or {}
        if mode == "edge":
            print()
            print("Edge per exit: " + ", ".join(f"{k} {pe[k]:.2f}" for k in sorted(pe, key=lambda x: int(x.split()[1]))))
            print()

ce, cp = f"{out}/check-edgec.json", f"{out}/check-peft.json"
if os.path.exists(ce) and os.path.exists(cp):
    a, b = json.load(open(ce)), json.load(open(cp))
    print(f"PEFT check: adapters of the full run loaded with PeftModel.from_pretrained: loss {b['loss']:.6f} "
          f"(PyTorch) vs {a['loss']:.6f} (edgec), |diff| {abs(a['loss'] - b['loss']):.2e}")
