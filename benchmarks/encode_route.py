"""Encode throughput against a plain forward, routing latency vs memory size, bytes per token.

Encode: the engine's document-wise encoding (isolated documents, pooling on the routing layers) against
a plain `AutoModelForCausalLM` forward of the same model over the same documents, batched the same way,
measured in the same run; the ratio is the figure (goal >= 0.9). Routing: synthetic unit-normalised keys
at the model's shape (routing layers x KV heads x head dim, P tokens per chunk) for memory sizes from
10K tokens up; medians over repeats. Writes JSON.

    python benchmarks/encode_route.py [--model DIR] [--docs N] [--max-tokens 10000000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sample_documents(n):
    """Real text: the project's sample corpus, repeated with variations to reach n documents."""
    folder = os.path.join(os.path.dirname(__file__), "..", "examples", "data")
    base = [open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder))]
    return [f"{base[i % len(base)]} (copy {i})" for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=10_000_000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "encode_route_cpu.json"))
    args = ap.parse_args()
    from msa_plugins import MSAEngine
    from msa_plugins.engine.memory import BankState
    from msa_plugins.engine.routing import route
    from msa_plugins.engine.encoding import normalise_heads

    engine = MSAEngine.from_pretrained(args.model, device="cpu")
    m = engine.model
    docs = sample_documents(args.docs)
    toks = [engine._tokenize(d) for d in docs]
    n_tok = sum(len(t) for t in toks)

    def encode():
        engine.encoder.encode(toks, progress=False)

    def plain_forward():  # same batches (the encoder's), full model, no capture, no pooling
        order = sorted(range(len(toks)), key=lambda i: -len(toks[i]))
        batch, width = [], 0
        for i in order + [None]:
            if i is None or (batch and max(width, len(toks[i])) * (len(batch) + 1) > engine.encoder.batch_tokens):
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                for b, j in enumerate(batch):
                    ids[b, :len(toks[j])] = torch.tensor(toks[j])
                with torch.inference_mode():
                    m.hf_model(ids)
                batch, width = [], 0
                if i is None:
                    break
            batch.append(i)
            width = max(width, len(toks[i]))

    encode(); plain_forward()  # warm-up
    t_enc = median_time(encode, args.repeats)
    t_plain = median_time(plain_forward, args.repeats)
    result = {
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "model": engine.name, "routing_layers": engine.routing_layers, "chunk_size": engine.config.chunk_size,
        "encode": {"documents": len(docs), "tokens": n_tok, "encode_s": t_enc, "plain_forward_s": t_plain,
                   "encode_tok_per_s": n_tok / t_enc, "plain_tok_per_s": n_tok / t_plain,
                   "ratio_encode_over_plain_throughput": t_plain / t_enc},
    }
    engine.add(docs[:8], progress=False)
    result["bytes_per_token"] = engine.memory.nbytes / engine.memory.n_tokens
    result["routing_key_bytes_per_token"] = engine.memory.state.keys_r.numel() * 4 / engine.memory.n_tokens

    # routing latency with synthetic keys at this model's shape
    L, G, D, P = len(engine.routing_layers), m.n_kv_heads, m.head_dim, engine.config.chunk_size
    q = engine.encoder.routing_queries(*(lambda p: (p.ids, p.question_mask))(
        __import__("msa_plugins.engine.generation", fromlist=["build_prompt"]).build_prompt(m, "Who built the lighthouse?")))
    rows = []
    size = 10_000
    while size <= args.max_tokens:
        C = max(1, size // P)
        n_docs = max(1, C // 4)  # documents of 4 chunks (256 tokens)
        if L * C * G * D * 4 > 6e9:
            break
        keys = normalise_heads(torch.randn(L, C, G * D), G)
        chunk_doc = torch.clamp(torch.arange(C) // 4, max=n_docs - 1)
        ids = tuple(str(i) for i in range(n_docs))
        state = BankState(ids=ids, texts=ids, metadata=({},) * n_docs, n_tokens=(256,) * n_docs,
                          doc_start=torch.zeros(n_docs + 1, dtype=torch.long), chunk_doc=chunk_doc, keys_r=keys,
                          keys=None, values=None, row_of={})
        route(q, state, engine.routing_layers, 16, backend="torch")
        t = median_time(lambda: route(q, state, engine.routing_layers, 16, backend="torch"), args.repeats)
        rows.append({"tokens": size, "chunks": C, "documents": n_docs, "routing_key_bytes": keys.numel() * 4,
                     "route_ms": t * 1e3, "GB_per_s": keys.numel() * 4 / t / 1e9})
        print(f"route {size:>12,} tokens: {t * 1e3:9.2f} ms ({keys.numel() * 4 / t / 1e9:.1f} GB/s)", flush=True)
        del keys, state
        size *= 10
    result["routing"] = rows
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    e = result["encode"]
    print(f"encode {e['encode_tok_per_s']:.0f} tok/s vs plain forward {e['plain_tok_per_s']:.0f} tok/s: "
          f"ratio {e['ratio_encode_over_plain_throughput']:.2f}; {result['bytes_per_token']:.0f} B/token "
          f"({result['routing_key_bytes_per_token']:.0f} B/token routing keys) -> {args.out}")


if __name__ == "__main__":
    main()
