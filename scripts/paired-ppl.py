#!/usr/bin/env python3
"""Paired comparison of two `edgec eval --json` reports on the same text and protocol.

    scripts/paired-ppl.py A.json B.json

Uses each report's `chunk_losses` (mean NLL per chunk): the mean difference A - B in nats,
its standard error over chunks, the t statistic, how many chunks favour A, and the
perplexity ratio. A negative difference with |t| > 2 means A is better beyond the
chunk-to-chunk noise.
"""
import json
import math
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    la, lb = a.get("chunk_losses"), b.get("chunk_losses")
    if not la or not lb:
        sys.exit("both reports need chunk_losses (edgec eval --json of this version)")
    if len(la) != len(lb):
        sys.exit(f"the reports scored different chunk counts ({len(la)} vs {len(lb)})")
    d = [x - y for x, y in zip(la, lb)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n) if n > 1 else float("nan")
    t = mean / se if se and se > 0 else float("nan")
    wins = sum(1 for x in d if x < 0)
    print(json.dumps({
        "chunks": n,
        "ppl_a": a["perplexity"],
        "ppl_b": b["perplexity"],
        "mean_diff_nats": mean,
        "stderr_nats": se,
        "t": t,
        "chunks_a_better": wins,
        "ppl_ratio": math.exp(a["loss"] - b["loss"]),
    }))


if __name__ == "__main__":
    main()
