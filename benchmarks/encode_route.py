"""Encode throughput against a plain forward, routing latency vs memory size, bytes per token.

Encode: the engine's document-wise encoding (`engine.add`: tokenize, encode on the routing layers, pool,
store) against a plain `AutoModelForCausalLM` forward of the same model folder over the same documents,
batched by the same token budget (`MSAConfig.batch_tokens`), measured in the same run; the ratio is the
figure (goal >= 0.9). Routing: synthetic unit-normalised keys at the model's shape (routing layers x KV
heads x head dim, P tokens per chunk) for memory sizes from 10K tokens up, scored with the engine's
PyTorch routing kernel (`msa_plugins.kernels`); medians over repeats. Writes JSON.

    python -m benchmarks.encode_route [--model DIR] [--docs N] [--max-tokens 10000000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib import resources

import torch

from msa_plugins import MSAEngine
from msa_plugins.kernels import doc_scores_torch, fold_queries, route_topk
from msa_plugins.models import resolve_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUESTION_TOKENS = 16  # a short question's routing tokens


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sample_documents(n):
    """Real text: the package's demo corpus, repeated with variations to reach n documents."""
    folder = resources.files("msa_plugins") / "data" / "demo" / "docs"
    base = sorted(p.read_text(encoding="utf-8") for p in folder.iterdir() if p.name.endswith(".txt"))
    return [f"{base[i % len(base)]} (copy {i})" for i in range(n)]


def padded_batches(token_lists, batch_tokens):
    """Longest first, a batch while (its width x its size) stays within batch_tokens -> LongTensors [B, W]."""
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    batch = []
    for i in order + [None]:
        width = max([len(token_lists[j]) for j in batch], default=0)
        if i is None or (batch and max(width, len(token_lists[i])) * (len(batch) + 1) > batch_tokens):
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for b, j in enumerate(batch):
                ids[b, :len(token_lists[j])] = torch.tensor(token_lists[j])
            yield ids
            batch = []
            if i is None:
                return
        batch.append(i)


def measure_encode(engine, model_folder, docs, repeats):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    plain = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    toks = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    ids = [f"doc-{i}" for i in range(len(docs))]

    def encode():
        engine.add(docs, ids=ids, progress=False)
        engine.delete(ids)

    def plain_forward():  # same documents, same token budget per batch, full model, no capture or pooling
        with torch.inference_mode():
            for batch in padded_batches(toks, engine.config.batch_tokens):
                plain(batch)

    encode(); plain_forward()  # warm-up
    t_enc = median_time(encode, repeats)
    t_plain = median_time(plain_forward, repeats)
    n_tok = sum(len(t) for t in toks)
    return plain.config, {"documents": len(docs), "tokens": n_tok, "encode_s": t_enc, "plain_forward_s": t_plain,
                          "encode_tok_per_s": n_tok / t_enc, "plain_tok_per_s": n_tok / t_plain,
                          "ratio_encode_over_plain_throughput": t_plain / t_enc}


def measure_routing(n_layers, n_heads, n_kv_heads, head_dim, chunk_size, max_tokens, repeats):
    """Routing latency on synthetic keys of this model's shape, 10K tokens and up by 10x."""
    L, H, G, D, P = n_layers, n_heads, n_kv_heads, head_dim, chunk_size
    q = fold_queries(torch.randn(L, QUESTION_TOKENS, H, D), G)  # [L, T, G*D]
    rows = []
    size = 10_000
    while size <= max_tokens:
        C = max(1, size // P)
        if L * C * G * D * 4 > 6e9:
            break
        n_docs = max(1, C // 4)  # documents of 4 chunks (256 tokens)
        keys = torch.nn.functional.normalize(torch.randn(L, C, G, D), dim=-1).view(L, C, G * D)
        chunk_doc = torch.clamp(torch.arange(C) // 4, max=n_docs - 1)

        def step():
            route_topk(doc_scores_torch(q, keys, chunk_doc, n_docs), 16)

        step()
        t = median_time(step, repeats)
        rows.append({"tokens": size, "chunks": C, "documents": n_docs, "routing_key_bytes": keys.numel() * 4,
                     "route_ms": t * 1e3, "GB_per_s": keys.numel() * 4 / t / 1e9})
        print(f"route {size:>12,} tokens: {t * 1e3:9.2f} ms ({keys.numel() * 4 / t / 1e9:.1f} GB/s)", flush=True)
        del keys
        size *= 10
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=10_000_000)
    ap.add_argument("--out", default=os.path.join(RESULTS, "encode_route_cpu.json"))
    args = ap.parse_args()

    engine = MSAEngine.from_pretrained(args.model, device="cpu")
    folder, _ = resolve_model(args.model)
    docs = sample_documents(args.docs)
    hf_config, encode = measure_encode(engine, folder, docs, args.repeats)
    info = engine.info()
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "model": info["model"], "routing_layers": info["routing_layers"], "chunk_size": info["chunk_size"],
              "encode": encode}

    engine.add(docs[:8], progress=False)
    info = engine.info()
    n_layers, G = len(info["routing_layers"]), hf_config.num_key_value_heads
    H = hf_config.num_attention_heads
    D = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // H
    result["bytes_per_token"] = info["bytes"] / info["tokens"]
    # float32 routing keys: one G*D vector per routing layer and chunk
    result["routing_key_bytes_per_token"] = n_layers * info["chunks"] * G * D * 4 / info["tokens"]
    result["routing"] = measure_routing(n_layers, H, G, D, info["chunk_size"], args.max_tokens, args.repeats)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    e = result["encode"]
    print(f"encode {e['encode_tok_per_s']:.0f} tok/s vs plain forward {e['plain_tok_per_s']:.0f} tok/s: "
          f"ratio {e['ratio_encode_over_plain_throughput']:.2f}; {result['bytes_per_token']:.0f} B/token "
          f"({result['routing_key_bytes_per_token']:.0f} B/token routing keys) -> {args.out}")


if __name__ == "__main__":
    main()
