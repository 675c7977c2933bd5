#!/usr/bin/env python3
"""PyTorch + PEFT baseline for Edge-LLM's tuning benchmark, and a PEFT load check.

  bench  --model GGUF --data train.txt [--seq 256 --steps 20 --warmup 3 --threads 2 --rank 8]
         Full-depth LoRA (PEFT, r=rank, alpha=2*rank, dropout 0, q,k,v,o,gate,up,down), AdamW
         lr 4e-4 wd 0.01, batch 1; one timed step = forward + loss + backward + optimizer step +
         zero_grad. Prints one JSON line: median seconds per step, tokens/s, peak RSS, RSS
         after the model is loaded.
  check  --model GGUF --adapters DIR --tokens FILE
         Loads an adapter directory written by `edgec tune` with PeftModel.from_pretrained
         and prints the causal-LM loss (labels = input ids, mean over all sequences) of the
         token file (one sequence of ids per line) as JSON.

The model is the GGUF file transformers dequantizes to fp32 (the same values `edgec` loads).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time


def rss_bytes():
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def load_model(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype="float32")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model.config.use_cache = False
    return model, tok


def bench(a):
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    # Touch every weight so that what follows measures tuning, not page-ins.
    with torch.no_grad():
        _ = sum(float(p.float().sum()) for p in model.parameters())
    rss_loaded, _ = rss_bytes()
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-4, weight_decay=0.01)
    with open(a.data, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False)["input_ids"]
    n = len(ids) // a.seq
    order = np.random.default_rng(0).permutation(n)
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        s = int(order[step % n]) * a.seq
        x = torch.tensor([ids[s:s + a.seq]])
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step >= a.warmup:
            times.append(dt)
        losses.append(float(loss))
        print(f"step {step} loss {float(loss):.4f} {dt:.3f} s", file=sys.stderr)
    _, peak = rss_bytes()
    med = statistics.median(times)
    print(json.dumps({
        "framework": "pytorch+peft", "torch": torch.__version__, "mode": "full", "seq": a.seq,
        "threads": a.threads, "rank": a.rank, "trainable": trainable, "steps_timed": len(times),
        "seconds_per_step": med, "tokens_per_second": a.seq / med, "peak_rss_bytes": peak,
        "rss_after_load_bytes": rss_loaded, "first_loss": losses[0], "final_loss": losses[-1],
    }))


def check(a):
    import torch
    from peft import PeftModel

    torch.set_num_threads(a.threads)
    model, _ = load_model(a.model)
    model = PeftModel.from_pretrained(model, a.adapters)
    model.eval()
    with open(a.tokens) as f:
        seqs = [[int(t) for t in line.split()] for line in f if line.strip()]
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([s])
            logits = model(input_ids=x).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += len(s) - 1
    print(json.dumps({"loss": total / count, "tokens_scored": count, "peft_modules": len(model.peft_config)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--model", required=True)
    b.add_argument("--data", required=True)
    b.add_argument("--seq", type=int, default=256)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--rank", type=int, default=8)
    c = sub.add_parser("check")
    c.add_argument("--model", required=True)
    c.add_argument("--adapters", required=True)
    c.add_argument("--tokens", required=True)
    c.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    bench(a) if a.cmd == "bench" else check(a)


if __name__ == "__main__":
    main()
