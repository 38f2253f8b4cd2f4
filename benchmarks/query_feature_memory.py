"""What the feature cache's query features cost in RAM: fp32 lists (before), fp16 lists, fp16 packed (now),
measured in the same run.

Adaptation (`msa adapt`) and `msa train-router` hold the routing-layer inputs of every query token
(`FeatureCache.q_inputs`, [L, tokens, hidden]): thousands of pseudo-queries, most of a feature cache, growing
with the corpus. This benchmark makes the router features of one query set three ways, each arm in its own
spawned process:
  - "fp32-list" (before stop 14): `query_features(dtype=float32)`, one tensor per query, then one
    fp32 concatenation per kind appended to the ones before, as `FeatureCache.add_queries` did;
  - "fp16-list": the same in fp16 (`QUERY_DTYPE`) through today's `FeatureCache.add_queries`;
  - "fp16-packed" (now, what adaptation and `build_cache` run): `packed_query_features` writes every
    query's features into one fp16 tensor that `add_queries` adopts (held once).
The query set is the one of a training feature cache (--cache: its questions and inverse-cloze pseudo-queries,
e.g. HotpotQA's 100 questions + 2,919 pseudo-queries from `benchmarks.train_default_router`), with the shipped
router's model and routing prompt. Reported (JSON, --results):
  - per arm: the process's peak RSS (ru_maxrss, model included), the bytes of the query features, seconds;
  - the routing each gives on the cache's bank with the shipped router: R@5 / MRR on the questions, and
    against fp32: the share of queries whose top 5 documents are the same, the largest layer-mean score
    difference.

    python -m benchmarks.query_feature_memory [--cache runs/router_cache-p16/hotpotqa-qall-ict2-s0] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_module
import resource
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(ROOT, "runs", "router_cache-p16", "hotpotqa-qall-ict2-s0")
ARMS = ("fp32-list", "fp16-list", "fp16-packed")


def make_features(arm: str, texts: list, kinds: list, threads: int, out_path: str) -> dict:
    """Child process: the router features of `texts` kept as `arm` says, saved to out_path in the order of
    `texts` -> measurements."""
    from safetensors.torch import save_file

    from msa_plugins import MSAEngine
    from msa_plugins.trainer import QUERY_DTYPE, FeatureCache, packed_query_features, query_features

    torch.set_num_threads(threads)
    engine = MSAEngine.from_pretrained(device="cpu")
    t0 = time.perf_counter()
    groups = [[i for i, k in enumerate(kinds) if k == kind] for kind in dict.fromkeys(kinds)]
    # the queries' features go into a cache with a one-document stand-in bank: only q_inputs is measured
    holder = FeatureCache(list(engine.routing_layers), ["d"], torch.tensor([0, 1]), torch.zeros(1, dtype=torch.long),
                          torch.zeros(len(engine.routing_layers), 1, engine.model.hidden_size))
    if arm == "fp16-packed":
        order = [i for sel in groups for i in sel]  # the cache's order: grouped by kind
        feats, n_tok = packed_query_features(engine, [texts[i] for i in order])
        holder.add_queries([texts[i] for i in order], feats, [[0]] * len(order), kind=[kinds[i] for i in order],
                           lengths=n_tok)
        del feats
        q, lengths = holder.q_inputs, dict(zip(order, n_tok.tolist()))
    else:
        # one tensor per query, as the features were made before (64 queries at a time, so that the packed
        # tensor query_features now splits is never more than 64 queries' worth)
        feats = []
        for b in range(0, len(texts), 64):
            part = query_features(engine, texts[b:b + 64], dtype=torch.float32 if arm == "fp32-list" else QUERY_DTYPE)
            feats += [x.clone() for x in part]
            del part
        if arm == "fp32-list":  # what add_queries did: one fp32 concatenation per kind, appended to the ones before
            q = None
            for sel in groups:
                new = torch.cat([feats[i] for i in sel], dim=1)  # [L, sum T, hidden]
                q = new if q is None else torch.cat([q, new], dim=1)
        else:
            for sel in groups:
                holder.add_queries([texts[i] for i in sel], [feats[i] for i in sel], [[0]] * len(sel))
            q = holder.q_inputs
        lengths = {i: x.shape[1] for i, x in enumerate(feats)}
        del feats
    seconds = time.perf_counter() - t0
    measured = {"arm": arm, "dtype": str(q.dtype).replace("torch.", ""), "feature_bytes": q.nbytes,
                "tokens": q.shape[1], "seconds": round(seconds, 1),
                "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)}
    # back to the order of `texts` (after the peak was read)
    start, offsets = 0, {}
    for sel in groups:
        for i in sel:
            offsets[i] = start
            start += lengths[i]
    idx = torch.cat([torch.arange(offsets[i], offsets[i] + lengths[i]) for i in range(len(texts))])
    save_file({"q_inputs": q.index_select(1, idx).contiguous(),
               "q_start": torch.tensor([0] + [lengths[i] for i in range(len(texts))]).cumsum(0)}, out_path)
    return measured


def _child(arm, texts, kinds, threads, out_path, queue):
    queue.put(make_features(arm, texts, kinds, threads, out_path))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="a feature cache of benchmarks.train_default_router")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "query_feature_memory"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "query_feature_memory.json"))
    ap.add_argument("--limit", type=int, default=None, help="only the cache's first N queries (a quick check)")
    args = ap.parse_args(argv)
    from safetensors.torch import load_file

    from msa_plugins.metrics import retrieval_metrics
    from msa_plugins.models import DEFAULT_ROUTER_DIR
    from msa_plugins.trainer import FeatureCache, Router, layer_mean_scores, rank

    bank = FeatureCache.load(args.cache)
    if args.limit:  # keep the first N queries (questions come first)
        n = min(args.limit, bank.n_queries)
        bank.q_text, bank.q_kind, bank.q_pos = bank.q_text[:n], bank.q_kind[:n], bank.q_pos[:n]
        bank.q_inputs, bank.q_start = bank.q_inputs[:, :int(bank.q_start[n])], bank.q_start[:n + 1]
    texts, kinds = list(bank.q_text), list(bank.q_kind)
    os.makedirs(args.work, exist_ok=True)
    ctx = mp.get_context("spawn")  # a fresh process per arm: its peak RSS is its own
    arms = {}
    for arm in ARMS:
        queue, load0 = ctx.Queue(), os.getloadavg()
        p = ctx.Process(target=_child, args=(arm, texts, kinds, args.threads,
                                             os.path.join(args.work, f"{arm}.safetensors"), queue))
        p.start()
        while True:  # a child killed (e.g. out of memory) never answers: report it instead of waiting forever
            try:
                arms[arm] = queue.get(timeout=10)
                break
            except queue_module.Empty:
                if not p.is_alive():
                    raise SystemExit(f"arm {arm}: the process ended with exit code {p.exitcode} and no result")
        p.join()
        arms[arm]["load_avg_start_end"] = [load0[0], os.getloadavg()[0]]
        print(arm, arms[arm], flush=True)

    router = Router.load(DEFAULT_ROUTER_DIR)
    if router.layers != bank.layers:
        raise SystemExit(f"the shipped router routes layers {router.layers}; the cache holds {bank.layers}")
    questions = bank.query_indices(["question"])
    everything = list(range(len(texts)))
    ranks, scores = {}, {}
    for arm in arms:
        t = load_file(os.path.join(args.work, f"{arm}.safetensors"))
        c = FeatureCache(bank.layers, bank.doc_ids, bank.doc_start, bank.chunk_doc, bank.inputs, texts, kinds,
                         bank.q_pos, t["q_start"], t["q_inputs"])
        c.check()
        ranks[arm] = rank(router, c, everything, topk=10)  # document ids, best first
        scores[arm] = layer_mean_scores(router, c, everything)  # [Q, N]
        arms[arm]["questions"] = retrieval_metrics([ranks[arm][q] for q in questions],
                                                   [[bank.doc_ids[p] for p in bank.q_pos[q]] for q in questions],
                                                   (1, 5, 10))
    base = ARMS[0]
    for arm in ARMS[1:]:
        a = arms[arm]
        a["rss_over_fp32_list"] = round(a["max_rss_gb"] / arms[base]["max_rss_gb"], 3)
        a["feature_bytes_over_fp32_list"] = round(a["feature_bytes"] / arms[base]["feature_bytes"], 3)
        a["same_top5_as_fp32_share"] = round(sum(set(x[:5]) == set(y[:5]) for x, y in zip(ranks[base], ranks[arm]))
                                             / len(texts), 4)
        a["max_abs_score_diff_vs_fp32"] = float((scores[base] - scores[arm]).abs().max())
    out = {"cache": os.path.relpath(args.cache, ROOT), "queries": len(texts), "questions": len(questions),
           "router": router.fingerprint(), "threads": args.threads, "machine": platform.platform(), "arms": arms}
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(out, f, indent=1)
    for arm, a in arms.items():
        q = a["questions"]
        print(f"{arm}: peak RSS {a['max_rss_gb']:.3f} GB, features {a['feature_bytes'] / 2 ** 20:.0f} MiB, "
              f"R@5 / MRR {q['recall@5']:.3f} / {q['mrr']:.3f}"
              + (f", same top 5 as fp32 {a['same_top5_as_fp32_share']:.4f}, max score diff "
                 f"{a['max_abs_score_diff_vs_fp32']:.1e}" if arm != base else ""))


if __name__ == "__main__":
    main()
