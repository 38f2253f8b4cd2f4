"""What reranking the routed documents with the engine's own model adds (`retrieve(..., rerank=N)`, issue 11).

For each question, four systems over one memory, k = 5 (single shot):
  msa            the router's ranking
  msa+rerank     its top N (default 20) reordered by the fused score: z(routing score) + z(mean log P(question |
                 UPR prompt with the document)) under the engine's own model (`engine/rerank.py`)
  hybrid         router + BM25 (`routing="hybrid"`)
  hybrid+rerank  the same reranking of hybrid's top N
Reported: R@1/5/10 (share of a question's gold passages in the top k), MRR, and per system the questions it finds
more / fewer gold passages for in its top 5 than the ranking it reranks. Seconds per question are measured on
the machine as it is (with its load average), so read them as a rough cost, not a benchmark of speed.

With `--rounds 2` every system routes k = 5 in all over 2 rounds (3 + 2, `retrieve(..., rounds=2)`: chain routing,
and with rerank each round's candidates reranked), and recall is over both rounds (`--results` then defaults to
rerank_routing_<corpus>_2rounds.json).

Only the public API. The memory is the one `msa eval` caches for the same model, router and corpus (encoded and
cached here when missing), or a saved memory folder (`--memory`) holding the evalset's documents under their ids.

    python -m benchmarks.rerank_routing --corpus hotpotqa      # then --corpus musique
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.round_routing import LOADERS, load_memory

SYSTEMS = {"msa": ("msa", 0), "msa+rerank": ("msa", None), "hybrid": ("hybrid", 0), "hybrid+rerank": ("hybrid", None)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="hotpotqa", choices=sorted(LOADERS))
    ap.add_argument("--router", default=None, help="router folder (default: the shipped one)")
    ap.add_argument("--memory", default=None, help="a saved memory of the evalset's documents (default: msa eval's cache)")
    ap.add_argument("--depth", type=int, default=20, help="rerank depth N")
    ap.add_argument("--limit", type=int, default=100, help="the evalset's questions (and so its memory), as msa eval")
    ap.add_argument("--questions", type=int, default=None, help="score only the first N of them (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="routing rounds, k = 5 in all (2: 3 + 2)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ",".join(SYSTEMS))
    ap.add_argument("--results", default=None, help="JSON (default benchmarks/results/rerank_routing_<corpus>.json)")
    args = ap.parse_args(argv)
    import torch

    from msa_plugins import MSAEngine
    from msa_plugins.integrations.ragas import datasets
    from msa_plugins.metrics import mean_scores, retrieval_scores

    torch.set_num_threads(args.threads)
    if args.memory:
        es = getattr(datasets, LOADERS[args.corpus])(limit=args.limit, seed=args.seed)
        engine = MSAEngine.from_pretrained(router=args.router, device=args.device)
        engine.load(args.memory)
        if sorted(engine.snapshot().ids) != sorted(es.doc_ids):
            raise SystemExit(f"{args.memory} does not hold the {args.corpus} evalset's documents")
    else:
        engine, es = load_memory(args.corpus, args.router, args.limit, args.seed, args.device)
    questions = [q for q in es.questions[:args.questions] if q.gold_doc_ids]
    unknown = [n for n in args.systems.split(",") if n not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {','.join(SYSTEMS)}")
    systems = {name: SYSTEMS[name] for name in args.systems.split(",")}
    # one round: the top 10 of one ranking; more rounds: the 5 documents of all rounds (recall over them)
    k, ks = (10, (1, 5, 10)) if args.rounds == 1 else (5, (1, 5))
    per_system = {name: [] for name in systems}
    seconds = {name: [] for name in systems}
    top5 = {name: [] for name in systems}
    t_start = time.perf_counter()
    for i, q in enumerate(questions):
        for name, (routing, rerank) in systems.items():
            t0 = time.perf_counter()
            docs = engine.retrieve(q.question, k=k, routing=routing, rounds=args.rounds,
                                   rerank=args.depth if rerank is None else 0)
            seconds[name].append(time.perf_counter() - t0)
            ids = [d.id for d in docs]
            per_system[name].append(retrieval_scores(ids, q.gold_doc_ids, ks))
            top5[name].append(len(set(ids[:5]) & set(q.gold_doc_ids)))
        if (i + 1) % 10 == 0:
            print(f"{i + 1} questions, {time.perf_counter() - t_start:.0f} s:",
                  {n: round(statistics.mean(r["recall@5"] for r in rows), 3) for n, rows in per_system.items()},
                  flush=True)
    out = {"corpus": args.corpus, "router": engine.info()["router"], "depth": args.depth, "rounds": args.rounds,
           "k": 5 if args.rounds > 1 else 10, "questions": len(questions),
           "load_average": list(os.getloadavg()), "systems": {}}
    for name, rows in per_system.items():
        base = name.split("+")[0]
        if base not in top5:
            base = name
        better = sum(a > b for a, b in zip(top5[name], top5[base]))
        worse = sum(a < b for a, b in zip(top5[name], top5[base]))
        out["systems"][name] = {**{k: round(v, 4) for k, v in mean_scores(rows).items()},
                                "median_seconds": round(statistics.median(seconds[name]), 3),
                                "vs_" + base: f"{better} better / {worse} worse" if name != base else None}
        print(name, json.dumps(out["systems"][name]), flush=True)
    out["per_question_gold_in_top5"] = top5
    suffix = "" if args.rounds == 1 else f"_{args.rounds}rounds"
    path = args.results or os.path.join(os.path.dirname(__file__), "results", f"rerank_routing_{args.corpus}{suffix}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
