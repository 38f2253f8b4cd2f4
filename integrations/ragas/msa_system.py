"""System B: an `MSAEngine` as harness functions (the same seam as every RAG baseline).

The engine must hold the evalset's memory under the same ids the RAG side reports:
    engine.add(evalset.memory_texts(), ids=evalset.doc_ids)
Then `{"msa": msa_retrieve_fn(engine)}` goes to run_retrieval_eval and `{"msa": msa_answer_fn(engine)}`
to run_ab_eval. Only the engine's public `retrieve()` / `query()` are used (duck-typed, no import of the
engine here, so this module loads without torch).
"""
from __future__ import annotations

from typing import Any, Callable

from .harness import AnswerResult, Context


def msa_retrieve_fn(engine: Any, routing: str | None = None, rounds: int = 1,
                    rerank: int = 0) -> Callable[[str, int], list[tuple[str, float]]]:
    """Routing only (no generation): the engine's layer-mean document ranking, best first. `routing`:
    None (the engine's default), "msa", "hybrid" or "lexical"; `rounds` > 1: k split over that many
    routing rounds (multi-hop), the documents of every round in routing order. `rerank` = N: the top
    max(N, k) reordered by the model's question likelihood (one ranking serves every k up to N)."""

    def retrieve(question: str, k: int) -> list[tuple[str, float]]:
        docs = engine.retrieve(question, k=k, routing=routing, rounds=rounds, rerank=rerank)
        return [(str(d.id), float(d.score)) for d in docs]

    # in rounds, k documents are k split over the rounds, not the top k of a deeper call: the harness asks each k
    retrieve.ranking_depends_on_k = rounds > 1
    return retrieve


def msa_answer_fn(engine: Any, **query_kwargs) -> Callable[[str], AnswerResult]:
    """Route + generate; contexts are the routed documents of every round, in routing order.
    query_kwargs go to `engine.query` (mode=, k=, rounds=, max_new_tokens=, ...; None = the default)."""

    def answer(question: str) -> AnswerResult:
        result = engine.query(question, **query_kwargs)
        contexts = [Context(str(d.id), d.text, float(d.score)) for d in result.documents]
        tokens = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                  "context_chars": sum(len(c.text) for c in contexts), "answer_chars": len(result.answer)}
        return AnswerResult(result.answer, contexts, dict(result.timings), tokens)

    return answer
