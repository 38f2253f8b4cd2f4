"""Retrieval metrics (recall@k, hit@k, all@k, MRR): one implementation for router training and evaluation.

Standard library only, so every layer may import it: the engine's router training (dev MRR, early
stopping), `msa eval` and the benchmarks score rankings with the same functions.

A ranking is a list of document ids, best first; gold is the collection of ids that answer the question.
A question without gold documents has no score (None) and is left out of the means.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence


def recall_at_k(retrieved_ids: Sequence, gold_ids: Iterable, k: int) -> Optional[float]:
    """Fraction of the gold documents found in the top k; None when the question has no gold documents."""
    gold = set(gold_ids)
    if not gold:
        return None
    return len(gold & set(list(retrieved_ids)[:k])) / len(gold)


def hit_at_k(retrieved_ids: Sequence, gold_ids: Iterable, k: int) -> Optional[float]:
    """1.0 when at least one gold document is in the top k."""
    gold = set(gold_ids)
    if not gold:
        return None
    return 1.0 if gold & set(list(retrieved_ids)[:k]) else 0.0


def all_at_k(retrieved_ids: Sequence, gold_ids: Iterable, k: int) -> Optional[float]:
    """1.0 when every gold document is in the top k (what a multi-hop question needs)."""
    gold = set(gold_ids)
    if not gold:
        return None
    return 1.0 if gold <= set(list(retrieved_ids)[:k]) else 0.0


def reciprocal_rank(retrieved_ids: Sequence, gold_ids: Iterable) -> Optional[float]:
    """1 / rank of the first gold document (0 when none was retrieved)."""
    gold = set(gold_ids)
    if not gold:
        return None
    for rank, doc_id in enumerate(retrieved_ids, start=1):
        if doc_id in gold:
            return 1.0 / rank
    return 0.0


def retrieval_scores(retrieved_ids: Sequence, gold_ids: Iterable, ks: Iterable[int]) -> dict:
    """Per question: recall@k, hit@k, all@k for every k, and mrr (None values when there is no gold)."""
    gold = list(gold_ids)
    scores: dict = {}
    for k in ks:
        scores[f"recall@{k}"] = recall_at_k(retrieved_ids, gold, k)
        scores[f"hit@{k}"] = hit_at_k(retrieved_ids, gold, k)
        scores[f"all@{k}"] = all_at_k(retrieved_ids, gold, k)
    scores["mrr"] = reciprocal_rank(retrieved_ids, gold)
    return scores


def mean_scores(per_question: Iterable[dict]) -> dict:
    """Average every metric over the questions where it is defined (None or NaN = not applicable, skipped)."""
    sums: dict = {}
    counts: dict = {}
    for scores in per_question:
        for name, value in scores.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            sums[name] = sums.get(name, 0.0) + float(value)
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


def retrieval_metrics(rankings: Sequence[Sequence], golds: Sequence[Iterable], ks=(1, 5, 10)) -> dict:
    """Mean recall@k (for each k) and MRR over the questions that have gold documents, plus `n_questions`
    (how many had). The means are NaN when no question has gold documents."""
    per_question = []
    for ranked, gold in zip(rankings, golds):
        gold = list(gold)
        if not gold:
            continue
        scores = {f"recall@{k}": recall_at_k(ranked, gold, k) for k in ks}
        scores["mrr"] = reciprocal_rank(ranked, gold)
        per_question.append(scores)
    means = mean_scores(per_question)
    names = [f"recall@{k}" for k in ks] + ["mrr"]
    return {name: means.get(name, float("nan")) for name in names} | {"n_questions": len(per_question)}


__all__ = ["recall_at_k", "hit_at_k", "all_at_k", "reciprocal_rank", "retrieval_scores", "mean_scores",
           "retrieval_metrics"]
