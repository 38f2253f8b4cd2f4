"""What a router's PopQA ranking holds besides the evidence: on the 400 PopQA test questions (the seeded split of
benchmarks/train_default_router.py), over the cached P_R = 16 features, per router folder:
  R@5 over both gold passages (the subject's page and the answer entity's page), the subject's page first / in the
  top 5, the answer entity's page in the top 5, and generic occupation pages per top 5 (an answer-type prior).

    python -m benchmarks.popqa_answer_pages msa_plugins/routers/smollm2-135m msa_plugins/routers/smollm2-135m-v3
"""
from __future__ import annotations

import argparse
import os

import torch

from msa_plugins.trainer import FeatureCache, Router, rank, split_indices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the answer pages most often gold in PopQA (the occupation relation's answers)
OCCUPATION_PAGES = {"Politician", "Actor", "Journalist", "Diplomat", "Screenwriter", "Film director",
                    "Record producer", "Mathematician", "Poet"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("routers", nargs="+")
    ap.add_argument("--cache", default=os.path.join(ROOT, "runs", "router_cache-p16", "popqa-qall-ict2-s0"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cache = FeatureCache.load(args.cache)
    qidx = cache.query_indices(["question"])
    _, _, test = split_indices(len(qidx), seed=0)
    qs = [qidx[i] for i in test]
    gold = [[cache.doc_ids[p] for p in cache.q_pos[q]] for q in qs]  # [subject page, answer page]
    n = len(qs)
    for path in args.routers:
        top5 = rank(Router.load(path), cache, qs, topk=5)
        both = sum(len(set(r) & set(g)) / len(g) for r, g in zip(top5, gold)) / n
        first = sum(r[0] == g[0] for r, g in zip(top5, gold)) / n
        in5 = sum(g[0] in r for r, g in zip(top5, gold)) / n
        answer5 = sum(len(g) > 1 and g[1] in r for r, g in zip(top5, gold)) / n
        generic = sum(sum(d in OCCUPATION_PAGES for d in r) for r in top5) / n
        print(f"{path}: R@5 (both golds) {both:.3f}, subject page first {first:.3f} / in top 5 {in5:.3f}, "
              f"answer page in top 5 {answer5:.3f}, occupation pages per top 5 {generic:.2f}")


if __name__ == "__main__":
    main()
