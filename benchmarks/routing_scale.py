"""Routing cost vs memory size at the paper's shape (the MSA paper, section 7): PyTorch vs the fused Triton kernel.

Synthetic bank: 18 routing layers, 8 KV heads x 128 dims, P = 64 tokens per chunk, documents of 1024
tokens on average (chunk -> document drawn at random, sorted), 64 question tokens from 32 query heads
folded to 8 groups. Keys are clustered (document topic + chunk noise, unit-normalised per head) so that
top-5 recall of int8 keys measures something. bf16 keys on CUDA, fp32 on CPU (no bf16 math there).

Routing must read every routing-key byte once, so the floor is bytes / peak bandwidth. The peak is
measured in the same run: a torch sum over a large tensor (read only) and a device-to-device copy
(read + write, counted as 2x bytes); the higher of the two is the bound's bandwidth (`bandwidth_basis`).

  python benchmarks/routing_scale.py                      # CUDA if present, else CPU (~4 GB, ~2 min)
  python benchmarks/routing_scale.py --max-tokens 1e6 --out /tmp/r.json
  python benchmarks/routing_scale.py --sizes 16384,1048576,1e8 --breakdown --graph --tune fast

Main columns (as in earlier runs): torch_ms / kernel_ms = doc_scores + `topk_docs` (one host sync).
--breakdown adds, per size and backend (CUDA events, medians): *_scores_ms (doc_scores alone), topk_ms
(`topk_docs` on ready scores), topk_sort_ms / topk_key_ms (sync-free `topk_docs_device`, both methods),
*_device_ms (doc_scores + topk_docs_device: no sync) and *_route_ms (doc_scores + `route_topk`: per-layer
and layer-mean top-k, one device -> host copy -- the engine's per-question path). --graph adds
*_graph_ms: that route step captured once in a CUDA graph (`RoutingGraph`), replay + the one copy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from msa_plugins.kernels import (RoutingGraph, doc_scores_torch, fold_queries, quantize_keys_int8, route_topk,
                                 topk_docs, topk_docs_device, triton_available)

L, G, D, H, P, T, DOC_TOKENS, K = 18, 8, 128, 32, 64, 64, 1024, 16
SIZES = [16_384, 65_536, 262_144, 1_048_576, 4_194_304, 16_777_216, 67_108_864, 100_000_000]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, dev, repeats: int, warmup: int) -> float:
    """Median wall time of fn() in ms: CUDA events around each call after warm-up, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_bandwidth(dev, dtype) -> dict:
    """Measured read bandwidth (GB/s): sum over a big tensor, and device-to-device copy (2x bytes)."""
    n_bytes = (4 << 30) if dev.type == "cuda" else (512 << 20)
    if dev.type == "cuda":
        n_bytes = min(n_bytes, torch.cuda.mem_get_info()[0] // 4)
    x = torch.ones(n_bytes // x_size(dtype), dtype=dtype, device=dev)
    y = torch.empty_like(x)
    reps = 10 if dev.type == "cuda" else 5
    t_sum = median_ms(lambda: x.sum(dtype=torch.float32), dev, reps, 2)
    t_copy = median_ms(lambda: y.copy_(x), dev, reps, 2)
    sum_gbs, copy_gbs = n_bytes / t_sum / 1e6, 2 * n_bytes / t_copy / 1e6
    del x, y
    basis = "sum (read only)" if sum_gbs >= copy_gbs else "device-to-device copy (read + write)"
    return {"sum_gbps": sum_gbs, "copy_gbps": copy_gbs, "peak_gbps": max(sum_gbs, copy_gbs),
            "bandwidth_basis": basis, "probe_bytes": n_bytes}


def x_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def make_bank(n_tokens: int, dev, dtype, gen: torch.Generator):
    """Clustered keys [L, C, G*D] (dtype), chunk_doc [C], n_docs, and folded queries [L, T, G*D] fp32."""
    C = math.ceil(n_tokens / P)
    n_docs = max(1, n_tokens // DOC_TOKENS)
    chunk_doc = torch.sort(torch.randint(0, n_docs, (C,), device=dev, generator=gen)).values
    keys = torch.empty(L, C, G * D, dtype=dtype, device=dev)
    targets = torch.randint(0, n_docs, (T,), device=dev, generator=gen)
    q_R = torch.empty(L, T, H, D, device=dev)
    weight = torch.linspace(0.6, 0.0, T, device=dev).view(T, 1, 1)       # graded relevance per token
    tile = 1 << 16
    for l in range(L):
        topic = torch.randn(n_docs, G, D, device=dev, generator=gen)
        for s in range(0, C, tile):
            e = min(C, s + tile)
            k = topic[chunk_doc[s:e]] + 0.8 * torch.randn(e - s, G, D, device=dev, generator=gen)
            keys[l, s:e] = torch.nn.functional.normalize(k, dim=-1).flatten(1).to(dtype)
        q_R[l] = weight * topic[targets].repeat_interleave(H // G, dim=1) + torch.randn(T, H, D, device=dev, generator=gen)
        del topic
    return keys, chunk_doc, n_docs, fold_queries(q_R, G)


def recall_at(ref_idx: torch.Tensor, got_idx: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(ref_idx.tolist(), got_idx.tolist()))
    return hits / max(1, ref_idx.numel())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-tokens", type=float, default=100e6)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20 CUDA, 3 CPU)")
    ap.add_argument("--cpu-mem-gb", type=float, default=4.0, help="CPU: largest key bank to build")
    ap.add_argument("--budget-s", type=float, default=120.0, help="CPU: stop before a size would exceed it")
    ap.add_argument("--headroom-gb", type=float, default=6.0, help="CUDA: memory left free")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated token counts (e.g. 16384,1048576,1e8) instead of the default ladder")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time doc_scores alone, top-k alone (both methods) and the sync-free route step")
    ap.add_argument("--graph", action="store_true", help="CUDA: also time the route step as a CUDA graph")
    ap.add_argument("--tune", default=None,
                    help="kernel configs to tune over: full, fast, or BLOCKxWARPSxSTAGES[,...] (sets MSA_ROUTING_TUNE)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tune:
        os.environ["MSA_ROUTING_TUNE"] = args.tune

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    device_name = torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} cores)"
    use_triton = cuda and triton_available() and not args.no_triton
    if use_triton:
        from msa_plugins.kernels.routing_triton import doc_scores_triton, last_config, tuning_configs
    repeats = args.repeats or (20 if cuda else 3)
    warmup = 3 if cuda else 1
    bw = peak_bandwidth(dev, dtype)
    print(f"device: {device_name}; peak bandwidth {bw['peak_gbps']:.0f} GB/s from {bw['bandwidth_basis']} "
          f"(sum {bw['sum_gbps']:.0f}, copy {bw['copy_gbps']:.0f})", flush=True)

    gen = torch.Generator(device=dev).manual_seed(0)
    rows, started = [], time.perf_counter()
    per_token_bytes = L * G * D * x_size(dtype) / P
    sizes = ([int(float(s)) for s in args.sizes.split(",") if s.strip()] if args.sizes
             else [s for s in SIZES if s <= args.max_tokens])
    for n_tokens in sizes:
        key_bytes = per_token_bytes * n_tokens
        int8_bytes = key_bytes / x_size(dtype) + L * math.ceil(n_tokens / P) * G * 4
        if cuda:
            free = torch.cuda.mem_get_info(dev)[0]
            if key_bytes + args.headroom_gb * 2**30 > free:
                print(f"{n_tokens:>11,} tokens: {key_bytes / 1e9:.1f} GB keys do not fit ({free / 1e9:.1f} GB free); stop")
                break
            do_int8 = not args.no_int8 and key_bytes + int8_bytes + args.headroom_gb * 2**30 <= free
        else:
            if key_bytes > args.cpu_mem_gb * 2**30:
                print(f"{n_tokens:>11,} tokens: {key_bytes / 1e9:.1f} GB keys over --cpu-mem-gb; stop")
                break
            if rows:   # routing and bank building grow linearly with size: project from the last size
                spent = rows[-1]["wall_s"] * n_tokens / rows[-1]["tokens"]
                if time.perf_counter() - started + spent > args.budget_s:
                    print(f"{n_tokens:>11,} tokens: projected {spent:.0f} s exceeds --budget-s; stop")
                    break
            do_int8 = not args.no_int8
        t_size = time.perf_counter()
        keys, chunk_doc, n_docs, q = make_bank(n_tokens, dev, dtype, gen)
        C = keys.shape[1]
        bytes_read = keys.numel() * keys.element_size() + chunk_doc.numel() * 8 + q.numel() * 4
        row = {"tokens": n_tokens, "chunks": C, "docs": n_docs, "key_dtype": str(dtype).replace("torch.", ""),
               "bytes_read": bytes_read, "bound_ms": bytes_read / (bw["peak_gbps"] * 1e6)}

        run_torch = lambda: topk_docs(doc_scores_torch(q, keys, chunk_doc, n_docs), K)
        row["torch_ms"] = median_ms(run_torch, dev, repeats, warmup)
        ref_scores = doc_scores_torch(q, keys, chunk_doc, n_docs)
        if use_triton:
            run_kernel = lambda: topk_docs(doc_scores_triton(q, keys, chunk_doc, n_docs), K)
            row["kernel_ms"] = median_ms(run_kernel, dev, repeats, warmup)
            got = doc_scores_triton(q, keys, chunk_doc, n_docs)
            fin = torch.isfinite(ref_scores)
            row["kernel_max_abs_diff_vs_torch"] = float((got[fin] - ref_scores[fin]).abs().max())
            row["kernel_top16_overlap_vs_torch"] = recall_at(topk_docs(ref_scores, K)[1], topk_docs(got, K)[1])
            row["kernel_over_bound"] = row["kernel_ms"] / row["bound_ms"]
            row["torch_over_kernel"] = row["torch_ms"] / row["kernel_ms"]
        row["torch_over_bound"] = row["torch_ms"] / row["bound_ms"]
        if use_triton:
            row["kernel_config"] = list(last_config() or ())
        if args.breakdown:
            breakdown(row, q, keys, chunk_doc, n_docs, ref_scores, dev, repeats, warmup,
                      doc_scores_triton if use_triton else None)
        if args.graph and cuda:
            graph_times(row, q, keys, chunk_doc, n_docs, dev, repeats, warmup, use_triton)

        if do_int8:
            k8, scale = quantize_keys_int8(keys, n_kv_heads=G, tile_chunks=1 << 14)
            if use_triton:
                s8 = doc_scores_triton(q, k8, chunk_doc, n_docs, keys_scale=scale)
                row["int8_kernel_ms"] = median_ms(
                    lambda: topk_docs(doc_scores_triton(q, k8, chunk_doc, n_docs, keys_scale=scale), K),
                    dev, repeats, warmup)
                row["int8_bytes_read"] = k8.numel() + scale.numel() * 4 + chunk_doc.numel() * 8
                row["int8_bound_ms"] = row["int8_bytes_read"] / (bw["peak_gbps"] * 1e6)
                row["int8_kernel_config"] = list(last_config() or ())
                if args.breakdown:
                    row["int8_kernel_scores_ms"] = median_ms(
                        lambda: doc_scores_triton(q, k8, chunk_doc, n_docs, keys_scale=scale), dev, repeats, warmup)
                    row["int8_scores_over_bound"] = row["int8_kernel_scores_ms"] / row["int8_bound_ms"]
                    if "kernel_scores_ms" in row:   # worth using only if faster than the bf16 keys
                        row["bf16_over_int8_scores"] = row["kernel_scores_ms"] / row["int8_kernel_scores_ms"]
                    s8_max_abs = (s8 - ref_scores)[torch.isfinite(ref_scores)].abs().max()
                    row["int8_max_abs_diff_vs_torch"] = float(s8_max_abs)
            else:
                s8 = doc_scores_torch(q, k8, chunk_doc, n_docs, keys_scale=scale)
            row["int8_recall_at_5"] = recall_at(topk_docs(ref_scores, 5)[1], topk_docs(s8, 5)[1])
            del k8, scale, s8
        del keys, chunk_doc, q, ref_scores
        if cuda:
            torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - t_size
        rows.append(row)
        print_row(row, header=len(rows) == 1)
        if args.breakdown or args.graph:
            print_breakdown(row)

    out = Path(args.out or Path(__file__).parent / "results" /
               f"routing_scale_{device_name.split(' (')[0].replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": device_name, "torch": torch.__version__, "shape": dict(L=L, G=G, D=D, H=H, P=P, T=T,
                                                                          doc_tokens=DOC_TOKENS, k=K),
        "bandwidth": bw, "repeats": repeats,
        "tune_configs": [list(c) for c in tuning_configs()] if use_triton else None,
        "timing": "median; CUDA events after warm-up" if cuda
        else "median; perf_counter after warm-up", "rows": rows}, indent=1))
    print(f"wrote {out}")


def breakdown(row: dict, q, keys, chunk_doc, n_docs: int, ref_scores, dev, repeats: int, warmup: int,
              doc_scores_triton=None):
    """Where the time goes: scoring alone, top-k alone (one-sync and sync-free), sync-free and routed steps."""
    t = lambda fn: median_ms(fn, dev, repeats, warmup)
    row["topk_ms"] = t(lambda: topk_docs(ref_scores, K))
    row["topk_sort_ms"] = t(lambda: topk_docs_device(ref_scores, K, method="sort"))
    row["topk_key_ms"] = t(lambda: topk_docs_device(ref_scores, K, method="topk"))
    row["route_topk_ms"] = t(lambda: route_topk(ref_scores, K))
    backends = [("torch", lambda: doc_scores_torch(q, keys, chunk_doc, n_docs))]
    if doc_scores_triton is not None:
        backends.append(("kernel", lambda: doc_scores_triton(q, keys, chunk_doc, n_docs)))
    for name, score in backends:
        row[f"{name}_scores_ms"] = t(score)
        row[f"{name}_device_ms"] = t(lambda: topk_docs_device(score(), K))
        row[f"{name}_route_ms"] = t(lambda: route_topk(score(), K))
    if "kernel_route_ms" in row:
        row["kernel_scores_over_bound"] = row["kernel_scores_ms"] / row["bound_ms"]
        row["torch_over_kernel_device"] = row["torch_device_ms"] / row["kernel_device_ms"]
        row["torch_over_kernel_route"] = row["torch_route_ms"] / row["kernel_route_ms"]


def graph_times(row: dict, q, keys, chunk_doc, n_docs: int, dev, repeats: int, warmup: int, use_triton: bool):
    """The route step (doc_scores + per-layer and layer-mean top-k + one copy) replayed from a CUDA graph."""
    # The kernel first: a failed capture of the other backend must not cost the figure that matters.
    for name, backend in ([("kernel", "triton")] if use_triton else []) + [("torch", "torch")]:
        try:
            graph = RoutingGraph(q, keys, chunk_doc, n_docs, K, backend=backend)
            expected = route_topk(doc_scores_torch(q, keys, chunk_doc, n_docs) if backend == "torch"
                                  else graph_reference(q, keys, chunk_doc, n_docs), K)
            got = graph(q)
            row[f"{name}_graph_matches_eager"] = all(torch.equal(a, b) for a, b in zip(got, expected))
            row[f"{name}_graph_ms"] = median_ms(lambda: graph(q), dev, repeats, warmup)
            row[f"{name}_graph_replay_ms"] = median_ms(graph.replay, dev, repeats, warmup)
            del graph
        except Exception as e:  # report, do not lose the rest of the run
            row[f"{name}_graph_error"] = f"{type(e).__name__}: {e}"[:300]
    if "kernel_graph_ms" in row:
        row["kernel_graph_over_bound"] = row["kernel_graph_ms"] / row["bound_ms"]
        row["torch_over_kernel_graph"] = row["torch_ms"] / row["kernel_graph_ms"]
        if "torch_graph_ms" in row:
            row["torch_graph_over_kernel_graph"] = row["torch_graph_ms"] / row["kernel_graph_ms"]


def graph_reference(q, keys, chunk_doc, n_docs):
    from msa_plugins.kernels.routing_triton import doc_scores_triton
    return doc_scores_triton(q, keys, chunk_doc, n_docs)


def print_breakdown(r: dict):
    keys = ["torch_scores_ms", "kernel_scores_ms", "kernel_scores_over_bound", "topk_ms", "topk_sort_ms",
            "topk_key_ms", "route_topk_ms", "torch_device_ms", "kernel_device_ms", "torch_route_ms",
            "kernel_route_ms", "torch_graph_ms", "kernel_graph_ms", "kernel_graph_replay_ms",
            "kernel_graph_over_bound", "torch_over_kernel_route", "torch_over_kernel_graph",
            "int8_kernel_scores_ms", "int8_bound_ms", "int8_scores_over_bound", "bf16_over_int8_scores",
            "int8_max_abs_diff_vs_torch", "kernel_config", "int8_kernel_config"]
    parts = [f"{k}={r[k]:.3f}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys if k in r]
    parts += [f"{k}={r[k]}" for k in r if k.endswith(("_error", "_matches_eager"))]
    print("    " + " ".join(parts), flush=True)


def print_row(r: dict, header: bool):
    cols = [("tokens", "{:,}"), ("bytes_read", "{:.3g}"), ("bound_ms", "{:.3f}"), ("torch_ms", "{:.3f}"),
            ("kernel_ms", "{:.3f}"), ("kernel_over_bound", "{:.2f}"), ("torch_over_kernel", "{:.2f}"),
            ("torch_over_bound", "{:.2f}"), ("int8_kernel_ms", "{:.3f}"), ("int8_recall_at_5", "{:.3f}")]
    if header:
        print(" ".join(f"{name:>17}" for name, _ in cols))
    print(" ".join(f"{fmt.format(r[name]) if name in r else '-':>17}" for name, fmt in cols), flush=True)


if __name__ == "__main__":
    main()
