"""How round 2 of multi-hop routing should read round 1 (issue 11, the 2-round goal), on the memory `msa eval`
caches: every variant routes k = 5 documents in total, 3 in round 1 (the question alone) and 2 in round 2 among
the documents not found yet. Recall over both rounds (share of a question's gold passages among the 5).

  single      no second round: the question's own top 5 (the single-shot reference)
  concat      round 2 routes the question once, with the text of all 3 round-1 documents as context
              (`MSAConfig.round_routing="concat"`, the engine's only way before stop 15)
  chain       the engine's default (`round_routing="chain"`): each round-1 document routes the question with
              its own text as context; a candidate's chain score = its parent's z-score in the question's
              ranking + its own z-score in the parent's ranking, best parent (MDR-style beam); top 2 chains.
              Read from `engine.retrieve(q, k=5, rounds=2)` itself.
  perdoc-max  as chain, without the parent's score (max over parents of the candidate's z-score)
  concat+q    concat's ranking z-summed with the question's own ranking (round 1's scores)
  perdoc+q    perdoc-max z-summed with the question's own ranking

Only the engine's public API (`route(..., context=, where=)`, `retrieve`): each ranking is read 100 deep (the
engine's fusion depth) before z-normalising. The first 50 scored questions and the rest are reported apart
("first50", "last50"), to see whether a variant's lead holds on both: the chain was chosen before these runs (the
MDR recipe), not fitted to these questions.

    python -m benchmarks.round_routing --corpus hotpotqa --routing hybrid \\
        --router runs/levers/routers/hotpotqa-distil-both+teacher-negatives@p16-s0

The memory comes from `msa eval`'s bank cache when that run cached it (same model, router, corpus), else it
is encoded and stored there.
"""
from __future__ import annotations

import argparse
import json
import os
import time

DEPTH = 100  # the engine's FUSION_DEPTH: how deep each ranking is read before z-normalising
LOADERS = {"hotpotqa": "load_hotpotqa_train100", "musique": "load_musique_train100", "popqa-test": "load_popqa_test"}


def zscores(scores: dict) -> dict:
    """id -> score, z-normalised over the list (population std; one score: 0)."""
    if len(scores) < 2:
        return {i: 0.0 for i in scores}
    vals = list(scores.values())
    mean = sum(vals) / len(vals)
    std = max((sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5, 1e-12)
    return {i: (v - mean) / std for i, v in scores.items()}


def zsum(*rankings: dict) -> dict:
    """Each ranking z-normalised, summed; a candidate missing from one gets that ranking's lowest z."""
    zs = [zscores(r) for r in rankings if r]
    floors = [min(z.values()) for z in zs]
    return {c: sum(z.get(c, f) for z, f in zip(zs, floors)) for c in set().union(*zs)}


def top(scores: dict, n: int) -> list:
    return [c for c, _ in sorted(scores.items(), key=lambda x: -x[1])[:n]]


def load_memory(corpus: str, router: str, limit: int, seed: int, device: str):
    from msa_plugins import MSAEngine
    from msa_plugins.integrations.ragas import datasets
    from msa_plugins.integrations.ragas.ab import BankCache, bank_key, default_bank_cache_dir

    es = getattr(datasets, LOADERS[corpus])(limit=limit, seed=seed)
    engine = MSAEngine.from_pretrained(router=router, device=device, keep_inputs=False)
    cache, key = BankCache(default_bank_cache_dir()), bank_key(engine, es)
    if cache.load(engine, es, key):
        print(f"{corpus}: memory loaded from the bank cache", flush=True)
    else:
        t0 = time.perf_counter()
        engine.add(es.memory_texts(), ids=es.doc_ids, progress=True)
        cache.store(engine, key)
        print(f"{corpus}: memory encoded in {time.perf_counter() - t0:.0f} s and cached", flush=True)
    return engine, es


def variants(engine, question: str, routing: str, doc_ids: list) -> dict:
    """The 5 documents of every variant (round 1's 3, then round 2's 2, except `single`)."""
    def ranking(context="", where=None):
        got = engine.route(question, k=DEPTH, context=context, where=where, routing=routing)
        return dict(zip(got.ids, got.scores))

    r1 = ranking()
    first = top(r1, 3)
    rest = [d for d in doc_ids if d not in set(first)]
    texts = {d.id: d.text for d in engine.get(first)}
    question_rest = {c: s for c, s in r1.items() if c not in set(first)}
    concat = ranking("\n\n".join(texts[i] for i in first), rest)
    per_doc = [zscores(ranking(texts[i], rest)) for i in first]
    per_max: dict = {}
    for z in per_doc:
        for c, s in z.items():
            per_max[c] = max(per_max.get(c, float("-inf")), s)
    chain = [d.id for d in engine.retrieve(question, k=5, rounds=2, routing=routing)]
    if chain[:3] != first:
        raise SystemExit(f"the engine's round 1 {chain[:3]} is not the question's top 3 {first}")
    return {"single": top(r1, 5), "concat": first + top(concat, 2), "chain": chain,
            "perdoc-max": first + top(per_max, 2), "concat+q": first + top(zsum(concat, question_rest), 2),
            "perdoc+q": first + top(zsum(per_max, question_rest), 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="hotpotqa", choices=sorted(LOADERS))
    ap.add_argument("--router", default=None, help="router folder (default: the shipped one)")
    ap.add_argument("--routing", default="hybrid", choices=("msa", "hybrid"))
    ap.add_argument("--limit", type=int, default=100, help="the evalset's questions (and so its memory), as msa eval")
    ap.add_argument("--questions", type=int, default=None, help="score only the first N of them (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=None, help="JSON (default benchmarks/results/round_routing_<corpus>_<routing>.json)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    engine, es = load_memory(args.corpus, args.router, args.limit, args.seed, args.device)
    doc_ids = [d.id for d in engine.snapshot().documents()]
    rows, t0 = [], time.perf_counter()
    for i, q in enumerate(es.questions[:args.questions]):
        gold = set(q.gold_doc_ids)
        if not gold:
            continue
        got = variants(engine, q.question, args.routing, doc_ids)
        rows.append({name: len(gold & set(docs)) / len(gold) for name, docs in got.items()})
        if (i + 1) % 25 == 0:
            print(f"{i + 1} questions, {time.perf_counter() - t0:.0f} s", flush=True)

    def mean(part):
        return {n: round(sum(r[n] for r in part) / len(part), 4) for n in rows[0]} if part else {}

    out = {"corpus": args.corpus, "router": engine.info()["router"], "router_dir": args.router, "routing": args.routing,
           "k": 5, "split": "3 + 2", "questions": len(rows), "recall@5": {"all": mean(rows), "first50": mean(rows[:50]),
                                                                          "last50": mean(rows[50:])},
           "seconds": round(time.perf_counter() - t0, 1), "per_question": rows}
    for part, vals in out["recall@5"].items():
        print(part, vals)
    path = args.results or os.path.join(os.path.dirname(__file__), "results",
                                        f"round_routing_{args.corpus}_{args.routing}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
