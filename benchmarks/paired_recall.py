"""Paired per-question recall of an `msa eval --retrieval-only` run against its RAG baseline.

For each question: how many gold passages each system found at k (with `--rounds`, each k from its own call,
`retrieved_at_k`); then, per system, the questions where it found more and fewer than the baseline, and a
two-sided sign test over those:

    python -m benchmarks.paired_recall docs/results/ab/hotpotqa-2round-chain-v5/records.jsonl [--k 5] [--baseline rag-minilm]
"""

from __future__ import annotations

import argparse
import json
from math import comb


def found_at_k(record: dict, k: int) -> int:
    gold = set(record["gold_doc_ids"])
    if "retrieved_at_k" in record:  # rounds: each k was its own call
        top = record["retrieved_at_k"][str(k)]
    else:
        top = [d["doc_id"] if isinstance(d, dict) else d for d in record["retrieved"][:k]]
    return len(gold & set(top))


def sign_test(better: int, worse: int) -> float:
    n = better + worse
    return min(1.0, 2 * sum(comb(n, i) for i in range(min(better, worse) + 1)) / 2 ** n) if n else 1.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", help="records.jsonl of an msa eval run")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--baseline", default="rag-minilm")
    args = ap.parse_args(argv)
    by: dict = {}
    with open(args.records) as f:
        for line in f:
            r = json.loads(line)
            by.setdefault(r["system"], {})[r["question_id"]] = found_at_k(r, args.k)
    if args.baseline not in by:
        raise SystemExit(f"no {args.baseline!r} records in {args.records}; systems: {sorted(by)}")
    base = by[args.baseline]
    print(f"{args.baseline}: {sum(base.values())} gold passages found at k = {args.k} over {len(base)} questions")
    for system, got in by.items():
        if system == args.baseline:
            continue
        qs = [q for q in base if q in got]
        better = sum(got[q] > base[q] for q in qs)
        worse = sum(got[q] < base[q] for q in qs)
        print(f"{system}: {sum(got[q] for q in qs)} found; more than {args.baseline} on {better} questions, fewer "
              f"on {worse} (sign test p = {sign_test(better, worse):.3f})")


if __name__ == "__main__":
    main()
