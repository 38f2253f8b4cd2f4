"""Does adapting a router on more routing layers route better? v4's five layers against all fifteen of the
model's upper half, both adapted to a corpus with no labels (the default adaptation: distil MiniLM + BM25, mined
negatives, 4 epochs, early stopping on held-out inverse-cloze queries).

`score_router --per-layer` shows the five layers acting as an ensemble (each alone far below their mean), which
makes more layers a candidate lever. The 15-layer router starts from v4 on its five layers and from the
tied-random init on the ten others. Rows (R@5 / MRR on the corpus's questions, never trained on):
  - v4: the shipped router, no training;
  - adapted-5: v4 adapted on its own five layers (what `msa adapt` does);
  - init-15: the 15-layer starting router, no training;
  - adapted-15: that router adapted the same way.
The feature cache holds all fifteen layers (--cache-dir, built once: about 10 minutes for HotpotQA on 2 CPU cores).

    python -m benchmarks.more_routing_layers --corpus hotpotqa
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.routing_levers import adapt_on_cache
from benchmarks.train_default_router import ROOT, get_cache, make_engine
from msa_plugins.models import DEFAULT_ROUTER_DIR
from msa_plugins.trainer import Router, evaluate, init_router_weights

LEVER = "distil-both+teacher-negatives"  # the default adaptation (routing_levers.md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="hotpotqa", choices=("hotpotqa", "musique"))
    ap.add_argument("--first-layer", type=int, default=15, help="route on layers first..last of the model")
    ap.add_argument("--last-layer", type=int, default=29)
    ap.add_argument("--chunk-size", type=int, default=16, help="P_R, tokens per routing key")
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", "router_cache-p16-L15"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=None, help="JSON (default docs/results/more_routing_layers_<corpus>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = list(range(args.first_layer, args.last_layer + 1))
    box = {}

    def engine():
        if "e" not in box:
            box["e"] = make_engine("cpu", layers, args.chunk_size)
        return box["e"]

    cache, evalset = get_cache(args.corpus, args.cache_dir, engine, None, None, args.seed, 2)
    texts = [d.memory_text() for d in evalset.documents]
    questions = cache.query_indices(["question"])
    v4 = Router.load(DEFAULT_ROUTER_DIR)
    if not set(v4.layers) <= set(layers):
        raise SystemExit(f"the shipped router's layers {v4.layers} are not all among {layers}")
    five = cache.on_layers(v4.layers)
    rows = {}

    def report(name, router, c, info=None):
        rows[name] = {**evaluate(router, c, questions), **(info or {})}
        print(f"{name}: R@5 / MRR {rows[name]['recall@5']:.3f} / {rows[name]['mrr']:.3f}", flush=True)

    report("v4", v4, five)
    r5, info = adapt_on_cache(five, texts, LEVER, args.seed, v4, engine, corpus=args.corpus)
    report("adapted-5", r5, five, {k: info[k] for k in ("dev_ict_mrr", "epochs_run", "train_s")})
    model = engine().model
    wq, wk = init_router_weights(model, layers, "tied-random", args.seed)
    for layer in v4.layers:  # v4's trained projectors on its own layers
        wq[layer], wk[layer] = v4.wq[layer].clone(), v4.wk[layer].clone()
    init = Router(wq, wk, model.n_heads, model.n_kv_heads, model.head_dim, dict(v4.meta))
    report(f"init-{len(layers)}", init, cache)
    t0 = time.perf_counter()
    r_all, info = adapt_on_cache(cache, texts, LEVER, args.seed, init, engine, corpus=args.corpus)
    report(f"adapted-{len(layers)}", r_all, cache, {k: info[k] for k in ("dev_ict_mrr", "epochs_run", "train_s")})
    out = {"corpus": args.corpus, "layers": layers, "shipped_layers": v4.layers, "shipped": v4.fingerprint(),
           "questions": len(questions), "lever": LEVER, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    path = args.results or os.path.join(ROOT, "docs", "results", f"more_routing_layers_{args.corpus}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
