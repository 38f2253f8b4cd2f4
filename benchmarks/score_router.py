"""Score router folders on the cached features of HotpotQA / MuSiQue (full banks, all questions): pure routing
(the engine's layer-mean score) and hybrid (fused with BM25 exactly as `routing="hybrid"` fuses them).

Reads feature caches built by `benchmarks.train_default_router.get_cache` (e.g. runs/router_cache-p16 for
16-token routing keys); it never encodes, so it runs in seconds. Writes --results (JSON). Example:

    msa train-router --corpus hotpotqa.jsonl --out runs/tr-hotpotqa
    python -m benchmarks.score_router --corpus hotpotqa runs/tr-hotpotqa msa_plugins/routers/smollm2-135m

--per-layer also scores each routing layer alone, the upper layers alone, and other ways to combine the layers'
document scores than the engine's mean (z-scored mean, max, reciprocal rank fusion): what the layers add.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from msa_plugins.integrations.ragas import datasets as ds
from msa_plugins.metrics import retrieval_metrics
from msa_plugins.trainer import FeatureCache, Router, evaluate, hybrid_rank, layer_mean_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADERS = {"hotpotqa": ds.load_hotpotqa_train100, "musique": ds.load_musique_train100}


def per_layer(router: Router, cache: FeatureCache, qs: list) -> dict:
    """R@k / MRR of each routing layer alone, of the upper layers, and of other combinations of the layers'
    document scores than their mean (the engine's): z-scored mean, max, reciprocal rank fusion (k = 60)."""
    scores = torch.stack([layer_mean_scores(Router({l: router.wq[l]}, {l: router.wk[l]}, router.n_heads,
                                                   router.n_kv_heads, router.head_dim, dict(router.meta)),
                                            cache.on_layers([l]), qs)
                          for l in cache.layers])  # [L, B, N]: each layer's document scores
    gold = [[cache.doc_ids[p] for p in cache.q_pos[q]] for q in qs]

    def metrics(agg):  # agg [B, N] -> retrieval metrics of its top 10
        return retrieval_metrics([[cache.doc_ids[j] for j in row] for row in agg.topk(10, dim=1).indices.tolist()],
                                 gold, ks=(1, 5, 10))

    out = {f"layer {l} alone": metrics(scores[i]) for i, l in enumerate(cache.layers)}
    for i in range(1, len(cache.layers) - 1):
        out[f"layers {cache.layers[i:]} (mean)"] = metrics(scores[i:].mean(0))
    z = (scores - scores.mean(-1, keepdim=True)) / scores.std(-1, keepdim=True)
    ranks = scores.argsort(-1, descending=True).argsort(-1).float()  # 0 = best
    out.update({"all layers, mean (the engine's)": metrics(scores.mean(0)), "all layers, z-scored mean": metrics(z.mean(0)),
                "all layers, max": metrics(scores.max(0).values), "all layers, RRF": metrics((1 / (60 + ranks)).sum(0))})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("routers", nargs="+", help="router folders")
    ap.add_argument("--corpus", choices=sorted(LOADERS), default="hotpotqa")
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", "router_cache-p16"))
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--results", default=None, help="JSON to write (default: print only)")
    ap.add_argument("--per-layer", action="store_true", help="also each layer alone, upper layers, other combinations")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cache = FeatureCache.load(os.path.join(args.cache_dir, f"{args.corpus}-qall-ict2-s0"))
    evalset = LOADERS[args.corpus](data_root=args.data_root)
    if cache.doc_ids != [d.id for d in evalset.documents]:
        raise SystemExit(f"the feature cache in {args.cache_dir} is not of this {args.corpus} bank")
    qs = cache.query_indices(["question"])
    gold = [[cache.doc_ids[p] for p in cache.q_pos[q]] for q in qs]
    texts = [d.memory_text() for d in evalset.documents]
    out = {"corpus": args.corpus, "documents": cache.n_docs, "questions": len(qs), "routers": {}}
    for path in args.routers:
        router = Router.load(path)
        # scores pair the router's layers with the cache's by position: a router for other layers would be
        # scored wrongly, not refused, further down. Another routing chunk size is legitimate (keys are linear
        # in the pooled inputs) but worth seeing.
        if router.layers != cache.layers:
            raise SystemExit(f"{path} routes layers {router.layers}; the cache holds layers {cache.layers}")
        p_r, cache_p = router.meta.get("routing_chunk_size"), cache.meta["fingerprint"]["chunk_size"]
        if p_r is not None and p_r != cache_p:
            print(f"note: {path} was trained on {p_r}-token routing keys, scored here on {cache_p}-token ones")
        hybrid = retrieval_metrics(hybrid_rank(router, cache, qs, [cache.q_text[q] for q in qs], texts, topk=20),
                                   gold, ks=(1, 5, 10))
        row = {"pure": evaluate(router, cache, qs), "hybrid": hybrid, "fingerprint": router.fingerprint(),
               "provenance": router.meta.get("provenance")}
        if args.per_layer:
            row["per_layer"] = per_layer(router, cache, qs)
            for k, m in row["per_layer"].items():
                print(f"  {k}: R@5 / MRR {m['recall@5']:.3f} / {m['mrr']:.3f}", flush=True)
        out["routers"][path] = row
        print(f"{path}: R@5 / MRR pure {row['pure']['recall@5']:.3f} / {row['pure']['mrr']:.3f}, "
              f"hybrid {hybrid['recall@5']:.3f} / {hybrid['mrr']:.3f}", flush=True)
    if args.results:
        with open(args.results, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
