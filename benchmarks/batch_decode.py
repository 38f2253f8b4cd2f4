"""Batched decoding and the preallocated KV cache, measured in one run (medians, A and B alternated).

1. throughput: the same N requests (default 8) run one after another, then concurrently through the
   batch scheduler (continuous batching); generated tokens per second of each, and whether every
   batched answer equals its sequential one (greedy).
2. single-request decode at ~1K tokens of context: the preallocated cache against the per-token
   `torch.cat` cache it replaced (MSA_KV_CACHE=cat), decode tokens per second (after the first token).

    python benchmarks/batch_decode.py [--model DIR] [--requests 8] [--new-tokens 32] [--repeats 3]

Writes benchmarks/results/batch_decode.json. The CPU may be shared: the load average is recorded beside
every measurement and threads are pinned (--threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from msa_plugins import MSAEngine
from msa_plugins.scheduler import batched

PROMPTS = ["Tell me a story about a lighthouse keeper.", "Explain how a bakery makes bread in the morning.",
           "Describe a chess game between two old friends.", "Write about a garden in spring.",
           "What happens at a summer music festival?", "Tell me about a robot that learns to paint.",
           "Describe a long train journey through the mountains.", "Explain how vaccines train the immune system.",
           "Write about a city at night.", "Describe the sea in winter.", "Tell me about a small village school.",
           "Explain how a river shapes a valley."]


def messages(text: str) -> list:
    return [{"role": "user", "content": text}]


def sequential(engine, prompts, n_new):
    t0 = time.perf_counter()
    results = [engine.generate(messages(p), max_new_tokens=n_new) for p in prompts]
    return results, time.perf_counter() - t0


def concurrent(engine, prompts, n_new, max_batch):
    results = [None] * len(prompts)
    with batched(engine, max_batch=max_batch) as scheduler:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, engine.generate(messages(prompts[i]), max_new_tokens=n_new))) for i in range(len(prompts))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        mean_rows = scheduler.batch_rows / max(scheduler.steps, 1)
    return results, wall, mean_rows


def decode_rate(engine, prompt, n_new, kind):
    os.environ["MSA_KV_CACHE"] = kind
    try:
        r = engine.generate(prompt, max_new_tokens=n_new)
    finally:
        os.environ.pop("MSA_KV_CACHE", None)
    steps = r.completion_tokens - 1  # decode steps after the first token (which comes from the prefill)
    return steps / r.timings["decode_s"] if steps > 0 and r.timings["decode_s"] > 0 else float("nan"), r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--context", type=int, default=1024, help="context tokens for the single-request comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch_decode.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = MSAEngine.from_pretrained(args.model, device="cpu")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]

    # -- 1. N requests: one after another vs together
    runs = []
    for rep in range(args.repeats):
        seq, seq_s = sequential(engine, prompts, args.new_tokens)
        bat, bat_s, rows = concurrent(engine, prompts, args.new_tokens, max_batch=args.requests)
        n_seq = sum(r.completion_tokens for r in seq)
        n_bat = sum(r.completion_tokens for r in bat)
        differ = sum(a.text != b.text for a, b in zip(seq, bat))
        runs.append({"sequential_tok_s": n_seq / seq_s, "batched_tok_s": n_bat / bat_s, "tokens": n_seq,
                     "mean_batch_rows": rows, "answers_differing": differ, "load": os.getloadavg()[0]})
        print(f"[throughput {rep}] sequential {n_seq / seq_s:.1f} tok/s, batched {n_bat / bat_s:.1f} tok/s "
              f"(x{(n_bat / bat_s) / (n_seq / seq_s):.2f}), differing answers {differ}, load {runs[-1]['load']:.1f}",
              flush=True)
    throughput = {"requests": args.requests, "new_tokens": args.new_tokens, "runs": runs,
                  "median_sequential_tok_s": statistics.median(r["sequential_tok_s"] for r in runs),
                  "median_batched_tok_s": statistics.median(r["batched_tok_s"] for r in runs),
                  "median_ratio": statistics.median(r["batched_tok_s"] / r["sequential_tok_s"] for r in runs),
                  "answers_differing": sum(r["answers_differing"] for r in runs)}

    # -- 2. one request at ~1K tokens of context: preallocated vs per-token cat
    filler = " ".join(PROMPTS) + " "
    text = filler
    while engine.count_tokens(text) < args.context - 40:
        text += filler
    long_prompt = messages(text + "\nSummarise the text above in detail.")
    pairs = []
    for rep in range(args.repeats):
        pre, r_pre = decode_rate(engine, long_prompt, args.new_tokens, "preallocated")
        cat, r_cat = decode_rate(engine, long_prompt, args.new_tokens, "cat")
        pairs.append({"preallocated_tok_s": pre, "cat_tok_s": cat, "ratio": pre / cat, "same_text": r_pre.text == r_cat.text,
                      "context_tokens": r_pre.prompt_tokens, "decode_steps": r_pre.completion_tokens - 1,
                      "load": os.getloadavg()[0]})
        print(f"[single {rep}] context {r_pre.prompt_tokens}: preallocated {pre:.2f} tok/s, cat {cat:.2f} tok/s "
              f"(x{pre / cat:.2f}), load {pairs[-1]['load']:.1f}", flush=True)
    single = {"runs": pairs, "median_preallocated_tok_s": statistics.median(r["preallocated_tok_s"] for r in pairs),
              "median_cat_tok_s": statistics.median(r["cat_tok_s"] for r in pairs),
              "median_ratio": statistics.median(r["ratio"] for r in pairs)}

    report = {"model": engine.model_name, "device": "cpu", "threads": args.threads, "cpus": os.cpu_count(),
              "torch": torch.__version__, "throughput": throughput, "single_request": single}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"batched/sequential x{throughput['median_ratio']:.2f} (goal 3), preallocated/cat "
          f"x{single['median_ratio']:.2f} (goal 1.3); {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
