import glob, json, os, statistics, sys
out, strides = sys.argv[1], sys.argv[2:]
med = statistics.median


def lines(p):
    return [json.loads(l) for l in open(p)]


def summary(p):
    return [d for d in lines(p) if "seconds_per_step" in d][-1]


def rounds(pattern, f):
    v = [f(p) for p in sorted(glob.glob(f"{out}/{pattern}"))]
    return med(v) if v else None


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


# Speed: the median over rounds of each run's median step (cached runs: of the steps that
# read the prefix cache).
full_s = rounds("speed-full-r*.jsonl", lambda p: summary(p)["seconds_per_step"])
full_heap = rounds("speed-full-r*.jsonl", lambda p: summary(p)["tuning_heap_peak_bytes"] / 2**20)
qfull = f"{out}/full.jsonl"
fv = summary(qfull)["valid_perplexity"]["last"] if os.path.exists(qfull) else None


def ratio(x):
    return None if x is None or full_s is None else full_s / x


print("| run | s/step | vs full | cached s/step | vs full | tuning heap MiB | vs full "
      "| valid ppl last | mean | max-confidence | weighted | last vs full |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
print(f"| full | {fmt(full_s, '.3f')} | 1.00x | | | {fmt(full_heap, '.0f')} | 1.00x "
      f"| {fmt(fv, '.2f')} | | | | |")
for s in strides:
    es = rounds(f"speed-edge-s{s}-r*.jsonl", lambda p: summary(p)["seconds_per_step"])
    cs = rounds(f"cached-edge-s{s}-r*.jsonl",
                lambda p: med([d["seconds"] for d in lines(p) if d.get("cached_prefix")]))
    heap = rounds(f"speed-edge-s{s}-r*.jsonl",
                  lambda p: summary(p)["tuning_heap_peak_bytes"] / 2**20)
    less = None if heap is None or full_heap is None else full_heap / heap
    q = f"{out}/edge-s{s}.jsonl"
    v = summary(q)["valid_perplexity"] if os.path.exists(q) else {}
    vs = None if fv is None or "last" not in v else 100 * (v["last"] / fv - 1)
    print(f"| edge stride {s} ({30 // int(s)} exits) | {fmt(es, '.3f')} | {fmt(ratio(es), '.2f')}x "
          f"| {fmt(cs, '.3f')} | {fmt(ratio(cs), '.2f')}x | {fmt(heap, '.0f')} | {fmt(less, '.2f')}x less "
          f"| {fmt(v.get('last'), '.2f')} | {fmt(v.get('mean'), '.2f')} "
          f"| {fmt(v.get('max-confidence'), '.2f')} | {fmt(v.get('weighted'), '.2f')} | {fmt(vs, '+.1f')}% |")
base = f"{out}/valid-base.json"
if os.path.exists(base):
    print(f"\nValidation perplexity before tuning: {json.load(open(base))['perplexity']:.2f}")
