"""Routing on LoCoMo: a corpus no routing lever was chosen on (conversational memory), every system on the same
memories and questions.

LoCoMo (`../shared/datasets/locomo`) holds 10 long conversations; each is its own memory, one document per
utterance ("[date] speaker: text"), and a question's gold documents are the turns its evidence names
(`integrations/ragas/datasets.py: load_locomo`; categories 1-4, the adversarial category 5 has no evidence to
find). Agent builders' long-term memory looks like this, and none of our routers, fusion rules or rerank variants
was picked on it, so it is a held-out check of the choices made on HotpotQA and MuSiQue.

Systems, top 5 of each (all through public APIs):
    minilm, bm25                 the RAG baselines of `msa eval` (LlamaIndex + all-MiniLM-L6-v2; bm25s)
    msa                          the shipped router (`engine.route`)
    hybrid                       router + the memory's BM25, fused (`routing="hybrid"`)
    hybrid+rerank                hybrid's top N reordered by the model's question likelihood (`rerank=N`)
    hybrid+rerank (path)         the same with `rerank_scoring="path"` (stop 32)
Reported per system: R@5 (share of a question's gold turns in the top 5, averaged), MRR (first gold turn), gold
turns found, and questions better / worse than the single rerank and than MiniLM, with a two-sided sign test;
also per category. LoCoMo is CC BY-NC: the results file keeps numbers only (per question: category, gold count,
hits and first-gold rank per system), no text.

    python -m benchmarks.locomo_routing --questions 30 --threads 2       # 30 seeded questions per conversation
    python -m benchmarks.locomo_routing --questions 30 --conversations 3 --adapt   # the router adapted first

`--adapt` adapts the router to each conversation's own turns before measuring (`engine.adapt_router`, `msa adapt`'s
defaults, no labels), so the msa, hybrid and rerank rows use the adapted router.

Writes benchmarks/results/locomo_routing.json, or locomo_routing_adapted.json (resumes per conversation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.paired_recall import sign_test

SYSTEMS = ("minilm", "bm25", "msa", "hybrid", "hybrid+rerank", "hybrid+rerank (path)")


def measure_conversation(es, depth: int, adapt: bool = False) -> tuple:
    """(one record per question: its category, gold count, and per system the hits in the top 5 and the 1-based
    rank of the first gold turn among the top `depth` (0: none); seconds the adaptation took, or None).
    `adapt`: the router is first adapted to the conversation's own turns (`engine.adapt_router`, no labels)."""
    from msa_plugins import MSAEngine
    from msa_plugins.integrations.ragas.baselines import BM25RAG, VectorRAG

    engine = MSAEngine.from_pretrained(device="cpu", keep_inputs=adapt)
    engine.add(es.memory_texts(), ids=es.doc_ids, progress=False)
    adapt_seconds = None
    if adapt:
        t0 = time.perf_counter()
        engine.adapt_router(progress=False)
        adapt_seconds = round(time.perf_counter() - t0, 1)
    minilm, bm25 = VectorRAG(es), BM25RAG(es)
    base = engine.config
    path = base.with_overrides(rerank_scoring="path")
    out = []
    for q in es.questions:
        if not q.gold_doc_ids:
            continue
        gold = set(q.gold_doc_ids)
        seconds = {}

        def timed(name, fn):
            t0 = time.perf_counter()
            ids = fn()
            seconds[name] = round(time.perf_counter() - t0, 2)
            return ids

        ranked = {
            "minilm": timed("minilm", lambda: [d for d, _ in minilm.retrieve(q.question, depth)]),
            "bm25": timed("bm25", lambda: [d for d, _ in bm25.retrieve(q.question, depth)]),
            "msa": timed("msa", lambda: list(engine.route(q.question, k=depth).ids)),
            "hybrid": timed("hybrid", lambda: list(engine.route(q.question, k=depth, routing="hybrid").ids)),
            "hybrid+rerank": timed("hybrid+rerank", lambda: [d.id for d in engine.retrieve(
                q.question, k=depth, routing="hybrid", rerank=depth)]),
        }
        engine.config = path  # the same memory, the other scoring
        try:
            ranked["hybrid+rerank (path)"] = timed("hybrid+rerank (path)", lambda: [d.id for d in engine.retrieve(
                q.question, k=depth, routing="hybrid", rerank=depth)])
        finally:
            engine.config = base
        out.append({"category": q.metadata.get("category"), "gold": len(gold),
                    "hits": {s: len(gold & set(ranked[s][:5])) for s in SYSTEMS},
                    "first_gold": {s: next((i + 1 for i, d in enumerate(ranked[s]) if d in gold), 0) for s in SYSTEMS},
                    "seconds": seconds})
    return out, adapt_seconds


def summarise(records: list) -> dict:
    def block(recs):
        res = {}
        for s in SYSTEMS:
            hits = [r["hits"][s] for r in recs]
            res[s] = {"recall@5": round(statistics.fmean(h / r["gold"] for h, r in zip(hits, recs)), 4),
                      "mrr": round(statistics.fmean(1 / r["first_gold"][s] if r["first_gold"][s] else 0.0
                                                    for r in recs), 4),
                      "gold_found": sum(hits)}
            for ref in ("hybrid+rerank", "minilm"):
                if s != ref:
                    better = sum(r["hits"][s] > r["hits"][ref] for r in recs)
                    worse = sum(r["hits"][s] < r["hits"][ref] for r in recs)
                    res[s][f"vs {ref}"] = f"{better} better / {worse} worse (p = {sign_test(better, worse):.3g})"
        return res

    cats = sorted({r["category"] for r in records})
    return {"questions": len(records), "gold_total": sum(r["gold"] for r in records), "all": block(records),
            "by_category": {str(c): dict(questions=sum(r["category"] == c for r in records),
                                         **block([r for r in records if r["category"] == c])) for c in cats},
            "median_seconds": {s: statistics.median(r["seconds"][s] for r in records) for s in SYSTEMS}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=30, help="seeded questions per conversation (categories 1-4)")
    ap.add_argument("--conversations", type=int, default=10, help="the first N of LoCoMo's 10 conversations")
    ap.add_argument("--depth", type=int, default=20, help="candidates the rerank reads (and ranks kept for MRR)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapt", action="store_true",
                    help="adapt the router to each conversation first (msa adapt's defaults, no labels)")
    ap.add_argument("--results", default=None,
                    help="JSON (default benchmarks/results/locomo_routing.json; --adapt: locomo_routing_adapted.json)")
    args = ap.parse_args(argv)
    args.results = args.results or os.path.join("benchmarks", "results",
                                                 "locomo_routing_adapted.json" if args.adapt else "locomo_routing.json")
    import torch

    from msa_plugins.integrations.ragas.datasets import load_locomo

    torch.set_num_threads(args.threads)
    done = {}
    if os.path.exists(args.results):
        with open(args.results) as f:
            done = json.load(f)
        settings = ("questions_per_conversation", "seed", "depth", "adapted")
        if tuple(done.get(key, False if key == "adapted" else None) for key in settings) != (
                args.questions, args.seed, args.depth, args.adapt):
            raise SystemExit(f"{args.results} was written with other settings: pass another --results")
    per_conv = done.get("conversations", {})
    for es in load_locomo(limit=args.questions, seed=args.seed)[:args.conversations]:
        sample = es.metadata["sample_id"]
        if sample in per_conv:
            continue
        t0 = time.perf_counter()
        records, adapt_seconds = measure_conversation(es, args.depth, args.adapt)
        per_conv[sample] = {"documents": len(es.documents), "records": records, "adapt_seconds": adapt_seconds}
        records = [r for c in per_conv.values() for r in c["records"]]
        done.update(questions_per_conversation=args.questions, seed=args.seed, depth=args.depth, adapted=args.adapt,
                    load_average=list(os.getloadavg()), conversations=per_conv, summary=summarise(records))
        with open(args.results + ".tmp", "w") as f:
            json.dump(done, f, indent=1)
        os.replace(args.results + ".tmp", args.results)
        a = done["summary"]["all"]
        print(f"{sample}: {len(es.documents)} turns, {time.perf_counter() - t0:.0f} s; "
              f"so far {len(records)} questions: "
              + ", ".join(f"{s} {a[s]['recall@5']:.3f}" for s in SYSTEMS), flush=True)
    print(json.dumps(done.get("summary", {}), indent=1))


if __name__ == "__main__":
    main()
