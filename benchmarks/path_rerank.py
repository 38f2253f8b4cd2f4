"""A path-aware rerank (`MSAConfig.rerank_scoring="path"`), measured (issue 11, stops 31-32).

The engine's rerank (`retrieve(..., routing="hybrid", rerank=20)`, `engine/rerank.py`) scores each of hybrid's top
20 candidates alone: mean log P(question | UPR prompt holding the candidate). A multi-hop question's later hop (the
bridge entity's page) rarely shares the question's words, so alone it scores low. Here the top-1 of the engine's
rerank is the anchor, and every candidate is also scored with the anchor in front of it (anchor + "\\n\\n" +
candidate, up to 640 passage tokens). The anchor keeps first place; the other candidates are ordered by z-scores
taken over them only:

  hybrid          hybrid's own order (no rerank)
  rerank          the engine's rerank: z(routing score) + z(likelihood alone), over all 20
  path            z(routing score) + z(pair likelihood)
  path+single     z(routing score) + z(likelihood alone) + z(pair likelihood)
  pair only       z(pair likelihood)
  path+single, all ranked
                  z(routing score) + z(likelihood alone) + z(pair likelihood) over all candidates, the anchor too
                  (its pair is the anchor twice) and placed by that sum like the others: what the engine's
                  `rerank_scoring="path"` does. Chosen in stop 32 after the four rows above were seen on these
                  questions, so its MuSiQue and HotpotQA rows are not a held-out test; the PopQA run is.

Reported per variant: R@5, gold passages in the top 5, and questions with more / fewer gold passages in the top 5
than `rerank`, with a two-sided sign test. Every question is kept in the results file, so a run resumes where it
stopped (a stopped run scores its first questions).

Two kinds of record. The committed runs (MuSiQue, HotpotQA, PopQA; stops 31-32) were made before the engine had
the option, by earlier versions of this script that read the likelihoods themselves (`scores`, `ll1`, `ll2`,
`anchor`): every variant above is computed from them, and the "rerank" and "all ranked" orders were checked
against the engine's. A run of this script uses only the public API (`route`, and `retrieve(..., rerank=N)` under
`rerank_scoring` "single" and "path"), so it records those two systems' top 5 and hybrid's order; the anchor-first
variants need the raw scores and are reported only where every record has them. The memory is `msa eval`'s cached
bank (as `benchmarks.rerank_routing`).

    python -m benchmarks.path_rerank --corpus hotpotqa --results /tmp/path_hotpotqa.json   # new run, ~1 min/question
    python -m benchmarks.path_rerank --corpus musique --report-only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.paired_recall import sign_test
from benchmarks.round_routing import LOADERS, load_memory

VARIANTS = ("hybrid", "rerank", "path", "path+single", "pair only", "path+single, all ranked")


def z(xs: list) -> list:
    mean, sd = statistics.fmean(xs), statistics.pstdev(xs)
    return [(x - mean) / (sd or 1.0) for x in xs]


def orderings(record: dict) -> dict:
    """Each variant's order of the record's candidates (indices into record["ids"])."""
    s, l1, l2, a = record["scores"], record["ll1"], record["ll2"], record["anchor"]
    n = len(s)
    fused = [x + y for x, y in zip(z(s), z(l1))]
    every = [x + y for x, y in zip(fused, z(l2))]
    rest = [j for j in range(n) if j != a]
    zs, z1, z2 = z([s[j] for j in rest]), z([l1[j] for j in rest]), z([l2[j] for j in rest])

    def anchor_first(score):
        return [a] + [rest[i] for i in sorted(range(len(rest)), key=lambda i: -score[i])]

    return {"hybrid": list(range(n)),
            "rerank": sorted(range(n), key=lambda j: -fused[j]),
            "path": anchor_first([x + y for x, y in zip(zs, z2)]),
            "path+single": anchor_first([x + y + w for x, y, w in zip(zs, z1, z2)]),
            "pair only": anchor_first(z2),
            # no anchor placement: the anchor's own pair is the anchor twice (stop 32; `rerank_scoring="path"`)
            "path+single, all ranked": sorted(range(n), key=lambda j: (-every[j], j))}


def measure_question(engine, question: str, depth: int, base_config) -> dict:
    """Hybrid's top `depth` ids, and the top 5 of the engine's rerank under each scoring (public API only)."""
    ids = list(engine.route(question, k=depth, routing="hybrid").ids)
    top5 = {}
    for scoring, row in (("single", "rerank"), ("path", "path+single, all ranked")):
        engine.config = base_config.with_overrides(rerank_scoring=scoring)  # one memory, both scorings
        top5[row] = [d.id for d in engine.retrieve(question, k=5, routing="hybrid", rerank=depth)]
    engine.config = base_config
    return dict(ids=ids, top5=top5)


def top5_of(record: dict, k: int = 5) -> dict:
    """Each variant's top k ids that this record can give."""
    if "ll1" in record:
        return {v: [record["ids"][j] for j in order[:k]] for v, order in orderings(record).items()}
    return {"hybrid": record["ids"][:k], **{v: ids[:k] for v, ids in record["top5"].items()}}


def report(records: list, k: int = 5) -> dict:
    tops = [top5_of(r, k) for r in records]
    variants = [v for v in VARIANTS if all(v in t for t in tops)]
    found = {v: [] for v in variants}
    recall = {v: [] for v in variants}
    for r, top in zip(records, tops):
        gold = set(r["gold"])
        for v in variants:
            hit = len(gold & set(top[v]))
            found[v].append(hit)
            recall[v].append(hit / len(gold))
    out = {}
    for v in variants:
        better = sum(a > b for a, b in zip(found[v], found["rerank"]))
        worse = sum(a < b for a, b in zip(found[v], found["rerank"]))
        out[v] = {f"recall@{k}": round(statistics.fmean(recall[v]), 4) if records else None,
                  "gold_found": sum(found[v]), "vs_rerank": f"{better} better / {worse} worse",
                  "sign_test_p": round(sign_test(better, worse), 4)}
    return {"systems": out, "per_question_gold_in_top5": found,
            "gold_total": sum(len(r["gold"]) for r in records),
            "gold_in_candidates": sum(len(set(r["gold"]) & set(r["ids"])) for r in records)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="hotpotqa", choices=sorted(LOADERS))
    ap.add_argument("--router", default=None, help="router folder (default: the shipped one)")
    ap.add_argument("--depth", type=int, default=20, help="hybrid's candidates read by the rerank")
    ap.add_argument("--limit", type=int, default=100, help="the evalset's questions (and so its memory), as msa eval")
    ap.add_argument("--questions", type=int, default=None, help="score only the first N of them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=None, help="JSON (default benchmarks/results/path_rerank_<corpus>.json)")
    ap.add_argument("--report-only", action="store_true", help="print the table of the results file, score nothing")
    args = ap.parse_args(argv)
    path = args.results or os.path.join("benchmarks", "results", f"path_rerank_{args.corpus}.json")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        if (done.get("corpus"), done.get("depth")) != (args.corpus, args.depth):
            raise SystemExit(f"{path} holds corpus={done.get('corpus')} depth={done.get('depth')}: "
                             "pass another --results")
    records = done.get("records", [])
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        engine, es = load_memory(args.corpus, args.router, args.limit, args.seed, args.device)
        router, base_config = engine.info()["router"], engine.config
        questions = [q for q in es.questions[:args.questions] if q.gold_doc_ids]
        seconds = done.get("seconds_per_question", [])
        for i, q in enumerate(questions):
            if i < len(records):
                if records[i]["question"] != q.question:
                    raise SystemExit(f"{path} was written for other questions (#{i}); pass another --results")
                continue
            t0 = time.perf_counter()
            rec = dict(question=q.question, gold=list(q.gold_doc_ids),
                       **measure_question(engine, q.question, args.depth, base_config))
            seconds.append(round(time.perf_counter() - t0, 1))
            records.append(rec)
            done.update(corpus=args.corpus, depth=args.depth, router=router, load_average=list(os.getloadavg()),
                        seconds_per_question=seconds, records=records)
            done.update(report(records))
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(done, f)
            os.replace(tmp, path)
            print(f"{i + 1}/{len(questions)} {seconds[-1]:.0f} s", flush=True)
    if not records:
        raise SystemExit(f"{path} holds no scored question; run without --report-only first")
    rep = report(records)
    if args.report_only:  # the summary of an older run, recomputed with today's variants
        done.update(rep)
        with open(path + ".tmp", "w") as f:
            json.dump(done, f)
        os.replace(path + ".tmp", path)
    print(f"{args.corpus}: {len(records)} questions, {rep['gold_total']} gold passages, "
          f"{rep['gold_in_candidates']} in hybrid's top {args.depth}")
    for v, m in rep["systems"].items():
        print(f"  {v:24s} R@5 {m['recall@5']:.3f}  gold {m['gold_found']:4d}  vs rerank {m['vs_rerank']} "
              f"(p = {m['sign_test_p']:.3g})")
    if done.get("seconds_per_question"):
        print(f"  median {statistics.median(done['seconds_per_question']):.0f} s a question")


if __name__ == "__main__":
    main()
