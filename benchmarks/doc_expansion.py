"""Document expansion with the model's own questions (docT5query style), measured on the routing side and on
the lexical side of hybrid routing.

Each passage that gave a doc2query question (`benchmarks/doc2query.py`, runs/d2q/<corpus>.jsonl) gets that
question as extra routing keys (the question encoded as a document of its own, its pooled chunks appended to
the passage's chunks: under the max-over-chunks score the passage then scores max(passage, its question)),
and/or as extra words in the BM25 index of hybrid routing. The passage text injected into the prompt would not
change: only what routes to it. Full bank, the corpus's evaluation questions (never trained on), the
engine's own routing score (`trainer.rank`) and hybrid rule (`trainer.hybrid_rank`).

    python -m benchmarks.doc2query --corpus hotpotqa --threads 1
    python -m benchmarks.doc_expansion --corpus hotpotqa --routers msa_plugins/routers/smollm2-135m
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.doc2query import d2q_path, load_questions
from benchmarks.router_eval import eval_questions
from benchmarks.routing_levers import derived_cache
from benchmarks.train_default_router import DEFAULT_LAYERS, ROOT, SHIPPED_ROUTER, make_engine
from msa_plugins.metrics import retrieval_metrics
from msa_plugins.trainer import FeatureCache, Router, build_features, hybrid_rank, rank


def expanded_cache(cache: FeatureCache, extra: FeatureCache, extra_of: dict) -> FeatureCache:
    """`cache` with, per document row n, the chunks of `extra`'s document extra_of[n] (when it has one) after its
    own chunks; queries as in `cache`. Obviously-correct loop: one index list, one index_select."""
    chunks = torch.cat([cache.inputs, extra.inputs], dim=1)  # [L, C + C_extra, hidden]
    base = cache.inputs.shape[1]
    order, starts = [], [0]
    for n in range(cache.n_docs):
        order += range(int(cache.doc_start[n]), int(cache.doc_start[n + 1]))
        m = extra_of.get(n)
        if m is not None:
            order += range(base + int(extra.doc_start[m]), base + int(extra.doc_start[m + 1]))
        starts.append(len(order))
    doc_start = torch.tensor(starts, dtype=torch.long)
    out = FeatureCache(layers=cache.layers, doc_ids=list(cache.doc_ids), doc_start=doc_start,
                       chunk_doc=torch.repeat_interleave(torch.arange(cache.n_docs), doc_start.diff()),
                       inputs=chunks.index_select(1, torch.tensor(order, dtype=torch.long)), meta=dict(cache.meta))
    out.q_text, out.q_kind, out.q_pos = cache.q_text, cache.q_kind, cache.q_pos
    out.q_start, out.q_inputs = cache.q_start, cache.q_inputs
    out.check()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, choices=("hotpotqa", "musique", "popqa"))
    ap.add_argument("--routers", default=SHIPPED_ROUTER, help="comma-separated router folders")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", "router_cache"))
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=os.path.join(ROOT, "runs", "doc_expansion.json"))
    args = ap.parse_args(argv)
    args.max_questions = None
    torch.set_num_threads(args.threads)
    box = {}

    def engine():
        if "e" not in box:
            box["e"] = make_engine("cpu", DEFAULT_LAYERS, chunk_size=args.chunk_size)
        return box["e"]

    cache, evalset = derived_cache(args.corpus, args, engine)
    pairs = load_questions(args.corpus)
    if not pairs:
        raise SystemExit(f"no doc2query questions in {d2q_path(args.corpus)}: run benchmarks.doc2query first")
    row = cache.row_of()
    pairs = [(d, q) for d, q in pairs if d in row]
    t0 = time.perf_counter()
    extra = build_features(engine(), [(f"d2q:{d}", "", q) for d, q in pairs], (), ict_per_doc=0, ict_titles=False)
    encode_s = time.perf_counter() - t0
    extra_of = {row[d]: m for m, (d, _) in enumerate(pairs)}
    big = expanded_cache(cache, extra, extra_of)

    q_idx = eval_questions(args.corpus, evalset, args.seed)
    golds = [evalset.questions[i].gold_doc_ids for i in q_idx]
    all_q = cache.query_indices(["question"])
    cq = [all_q[i] for i in q_idx]
    questions = [evalset.questions[i].question for i in q_idx]
    texts = [d.memory_text() for d in evalset.documents]
    question_of = {row[d]: q for d, q in pairs}
    texts_x = [t + ("\n" + question_of[n] if n in question_of else "") for n, t in enumerate(texts)]

    rows = {}
    for path in [p for p in args.routers.split(",") if p]:
        router = Router.load(path)
        name = os.path.basename(os.path.normpath(path))
        systems = {
            "router": lambda: rank(router, cache, cq, topk=10),
            "router, expanded keys": lambda: rank(router, big, cq, topk=10),
            "hybrid": lambda: hybrid_rank(router, cache, cq, questions, texts),
            "hybrid, expanded BM25": lambda: hybrid_rank(router, cache, cq, questions, texts_x),
            "hybrid, expanded keys + BM25": lambda: hybrid_rank(router, big, cq, questions, texts_x),
        }
        for system, run in systems.items():
            m = retrieval_metrics(run(), golds)
            rows[f"{name}: {system}"] = m
            print(f"{name}: {system}", {k: round(v, 3) for k, v in m.items() if isinstance(v, float)}, flush=True)
    result = {"corpus": args.corpus, "documents": cache.n_docs, "expanded": len(pairs),
              "extra_chunks": int(extra.inputs.shape[1]), "chunks": int(cache.inputs.shape[1]),
              "encode_questions_s": encode_s, "questions": len(q_idx), "rows": rows,
              "load": os.getloadavg()[0]}
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    allres = json.load(open(args.results)) if os.path.isfile(args.results) else {}
    allres[args.corpus] = result
    with open(args.results, "w") as f:
        json.dump(allres, f, indent=1)


if __name__ == "__main__":
    main()
