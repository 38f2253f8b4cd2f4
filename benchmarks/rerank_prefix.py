"""Path rerank with the anchor run once (MSA_RERANK_PREFIX=shared, the default) against every pair prompt run
whole (MSA_RERANK_PREFIX=off, the path before stop 33), measured in one run on `msa eval`'s cached banks.

`rerank_scoring="path"` scores each of hybrid's top N candidates twice: alone, and after the anchor's text. The
pair prompts of one question all start with the anchor, so its keys/values can be computed once and every row
attend to them (`engine/rerank.py`). Per question, three timed calls of the public API, in an order that
alternates between questions: `retrieve(q, k=5, routing="hybrid", rerank=N)` with path scoring, prefix shared and
off, and with single scoring (the cost path scoring is compared with), after one untimed call of each on the
first question. Recorded: seconds of each, whether the two
path runs return the same top 5 ids (and the largest difference of their fused scores), medians and the median
of the per-question ratios.

    python -m benchmarks.rerank_prefix --corpus hotpotqa --questions 8 --threads 2
    python -m benchmarks.rerank_prefix --corpus musique --questions 8 --threads 2

Writes benchmarks/results/rerank_prefix_<corpus>.json. The CPU may be shared: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.round_routing import LOADERS, load_memory

RUNS = ("path, shared", "path, off", "single")


def timed_retrieve(engine, question: str, depth: int, config, prefix: str) -> tuple:
    os.environ["MSA_RERANK_PREFIX"] = prefix
    engine.config = config
    t0 = time.perf_counter()
    docs = engine.retrieve(question, k=5, routing="hybrid", rerank=depth)
    return time.perf_counter() - t0, [d.id for d in docs], [d.score for d in docs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="hotpotqa", choices=sorted(LOADERS))
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--depth", type=int, default=20, help="hybrid's candidates the rerank reads")
    ap.add_argument("--limit", type=int, default=100, help="the evalset's questions (and so its memory), as msa eval")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=None, help="JSON (default benchmarks/results/rerank_prefix_<corpus>.json)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    engine, es = load_memory(args.corpus, None, args.limit, 0, "cpu")
    base = engine.config
    configs = {"path, shared": (base.with_overrides(rerank_scoring="path"), "shared"),
               "path, off": (base.with_overrides(rerank_scoring="path"), "off"),
               "single": (base.with_overrides(rerank_scoring="single"), "shared")}
    questions = [q.question for q in es.questions if q.gold_doc_ids][:args.questions]
    for run in RUNS:  # untimed: a process's first rerank ran 2-3x slower here (warm-up)
        config, prefix = configs[run]
        timed_retrieve(engine, questions[0], args.depth, config, prefix)
    records = []
    for i, q in enumerate(questions):
        order = RUNS if i % 2 == 0 else tuple(reversed(RUNS))
        rec = {"question": q}
        for run in order:
            config, prefix = configs[run]
            rec[run] = dict(zip(("seconds", "ids", "scores"), timed_retrieve(engine, q, args.depth, config, prefix)))
        rec["same_top5"] = rec["path, shared"]["ids"] == rec["path, off"]["ids"]
        rec["max_score_difference"] = max(abs(a - b) for a, b in zip(rec["path, shared"]["scores"],
                                                                      rec["path, off"]["scores"]))
        records.append(rec)
        print(f"{i + 1}/{len(questions)} " + "  ".join(f"{run} {rec[run]['seconds']:.1f} s" for run in RUNS)
              + f"  same top 5: {rec['same_top5']}", flush=True)
    os.environ.pop("MSA_RERANK_PREFIX", None)
    engine.config = base
    med = {run: statistics.median(r[run]["seconds"] for r in records) for run in RUNS}
    summary = {
        "median_seconds": {run: round(s, 2) for run, s in med.items()},
        "median_speedup_shared_over_off": round(statistics.median(
            r["path, off"]["seconds"] / r["path, shared"]["seconds"] for r in records), 3),
        "median_path_over_single": {run: round(statistics.median(
            r[run]["seconds"] / r["single"]["seconds"] for r in records), 3) for run in ("path, shared", "path, off")},
        "same_top5": sum(r["same_top5"] for r in records),
        "max_score_difference": max(r["max_score_difference"] for r in records),
    }
    out = dict(corpus=args.corpus, depth=args.depth, threads=args.threads, questions=len(records),
               load_average=list(os.getloadavg()), router=engine.info()["router"], **summary, records=records)
    path = args.results or os.path.join("benchmarks", "results", f"rerank_prefix_{args.corpus}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
