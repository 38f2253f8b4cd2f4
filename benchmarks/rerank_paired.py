"""Per question, gold passages found by each system of a `benchmarks.rerank_routing` result against single-shot
MiniLM at k = 5 from an `msa eval` run over the same questions (its records.jsonl), with a two-sided sign test:

    python -m benchmarks.rerank_paired benchmarks/results/rerank_routing_musique_2rounds.json \\
        docs/results/ab/musique-2round-chain-v5/records.jsonl
"""
from __future__ import annotations

import json
import sys

from benchmarks.paired_recall import found_at_k, sign_test


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit(__doc__)
    with open(argv[0]) as f:
        bench = json.load(f)
    with open(argv[1]) as f:
        minilm = [r for r in map(json.loads, f) if r["system"] == "rag-minilm" and r["gold_doc_ids"]]
    base = [found_at_k(r, 5) for r in minilm]
    print(f"minilm: {sum(base)} of {sum(len(r['gold_doc_ids']) for r in minilm)} gold passages")
    for name, found in bench["per_question_gold_in_top5"].items():
        ref = base[:len(found)]  # a run stopped early scored the first questions
        better, worse = sum(a > b for a, b in zip(found, ref)), sum(a < b for a, b in zip(found, ref))
        print(f"{name}: {sum(found)} vs {sum(ref)} ({sum(found) / max(sum(ref), 1):.3f}x) on {len(found)} questions, "
              f"{better} better / {worse} worse, p = {sign_test(better, worse):.3g}")


if __name__ == "__main__":
    main()
