"""The A/B harness: the same questions through every system, scored the same way.

The seam: a system is just a function.
- retrieval-only: `retrieve(question: str, k: int) -> list[(doc_id, score)]`, best first;
- end to end: `answer(question: str) -> AnswerResult` (or the tuple
  `(answer, contexts: [(doc_id, text, score)], timings: dict, tokens: dict)`).
RAG baselines come from baselines.py; MSA is plugged in as one more such function over the engine.
Objects with a `.retrieve(question, k)` method are accepted as retrieval systems too.

Plugging MSA in: encode `evalset.memory_texts()` under the ids `evalset.doc_ids` (both systems must see
the same strings and report the same ids), then e.g.
    systems = {"rag_minilm": VectorRAG(evalset), "msa": lambda question, k: <engine top-k as (doc_id, score)>}
    run_retrieval_eval(evalset, systems, out_dir="runs/popqa")

A memory per conversation / per NIAH sample: pass a list of EvalSets and, instead of a dict of systems,
a factory `build_systems(evalset) -> dict[name, fn]` (every memory needs its own index / encoding).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from . import metrics
from .datasets import EvalQuestion, EvalSet

CURVE_MAX_K = 20  # recall@k curves are drawn for k = 1..20


@dataclass
class Context:
    doc_id: str
    text: str = ""
    score: float = 0.0


@dataclass
class AnswerResult:
    answer: str
    contexts: list[Context] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


RetrieveFn = Callable[[str, int], Sequence[tuple[str, float]]]
AnswerFn = Callable[[str], "AnswerResult | tuple"]
Systems = "dict[str, Callable] | Callable[[EvalSet], dict[str, Callable]]"


@dataclass
class RunResult:
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: str | None = None


# ---------------------------------------------------------------- retrieval only

def run_retrieval_eval(
    evalset: EvalSet | list[EvalSet],
    systems,
    ks: Iterable[int] = (1, 5, 10),
    out_dir: str | None = None,
    command: str | None = None,
    progress: bool = True,
) -> RunResult:
    """Recall@k / hit@k / all@k / MRR and per-question latency of every system; no generation.

    A retrieve function whose k documents are not the first k of a deeper ranking (multi-round routing splits
    k over its rounds) says so with a true `ranking_depends_on_k` attribute: it is then called once per k, each
    k is scored on its own call (MRR and "retrieved" on the largest k's), and no recall curve is recorded."""
    ks = sorted(set(ks))
    depth = max(max(ks), CURVE_MAX_K)
    records = []
    for es, system_fns in _memories(evalset, systems):
        for name, fn in system_fns.items():
            retrieve = _as_retrieve_fn(fn)
            per_k = bool(getattr(retrieve, "ranking_depends_on_k", getattr(fn, "ranking_depends_on_k", False)))
            for q in _progress(es.questions, f"{name} on {es.name}", progress):
                record = _base_record(es, q, name)
                try:
                    lists = {}
                    for k in (ks if per_k else [depth]):
                        t0 = time.perf_counter()
                        lists[k] = [(str(d), float(s)) for d, s in retrieve(q.question, k)]
                        record["latency_s"] = time.perf_counter() - t0  # the last (largest) k's call
                except Exception as e:  # one failing question must not lose a long run
                    record["error"] = f"{type(e).__name__}: {e}"
                    records.append(record)
                    continue
                hits = lists[max(lists)]
                ids = [d for d, _ in hits]
                record["retrieved"] = [{"doc_id": d, "score": s} for d, s in hits]
                record["scores"] = metrics.retrieval_scores(ids, q.gold_doc_ids, ks)
                if per_k:  # each k from its own call: recall@5 of 2 rounds is 3 + 2 documents, not round 1's top 5
                    record["retrieved_at_k"] = {str(k): [d for d, _ in lists[k]] for k in ks}
                    for k in ks:
                        at_k = metrics.retrieval_scores(record["retrieved_at_k"][str(k)], q.gold_doc_ids, [k])
                        record["scores"].update({m: v for m, v in at_k.items() if m != "mrr"})
                else:
                    record["recall_curve"] = [metrics.recall_at_k(ids, q.gold_doc_ids, k)
                                              for k in range(1, CURVE_MAX_K + 1)]
                records.append(record)
    return _finish("retrieval", evalset, records, ks, out_dir, command)


# ---------------------------------------------------------------- end to end

def run_ab_eval(
    evalset: EvalSet | list[EvalSet],
    systems,
    ks: Iterable[int] = (1, 5, 10),
    ragas_metrics: bool = True,
    judge: metrics.Judge | None = None,
    out_dir: str | None = None,
    command: str | None = None,
    progress: bool = True,
) -> RunResult:
    """Answer every question with every system; score retrieval (from the returned contexts' doc ids),
    answers (contains / token F1 / string_match_all), RAGAS non-LLM metrics, and, only with a judge,
    the 0-5 LLM grade and RAGAS faithfulness / answer correctness."""
    ks = sorted(set(ks))
    records = []
    for es, system_fns in _memories(evalset, systems):
        for name, fn in system_fns.items():
            for q in _progress(es.questions, f"{name} on {es.name}", progress):
                record = _base_record(es, q, name)
                try:
                    t0 = time.perf_counter()
                    result = as_answer_result(fn(q.question))
                    record["latency_s"] = time.perf_counter() - t0
                except Exception as e:
                    record["error"] = f"{type(e).__name__}: {e}"
                    records.append(record)
                    continue
                ids = [c.doc_id for c in result.contexts]
                record.update(answer=result.answer, timings=result.timings, tokens=result.tokens,
                              retrieved=[{"doc_id": c.doc_id, "score": c.score, "text": c.text}
                                         for c in result.contexts])
                scores = {}
                if q.gold_doc_ids:
                    scores.update(metrics.retrieval_scores(ids, q.gold_doc_ids, ks))
                    record["recall_curve"] = [metrics.recall_at_k(ids, q.gold_doc_ids, k)
                                              for k in range(1, CURVE_MAX_K + 1)]
                scores.update(metrics.answer_scores(result.answer, q.answers))
                if ragas_metrics:
                    scores.update(metrics.ragas_non_llm_scores(q.question, result.answer, q.answers,
                                                               [c.text for c in result.contexts], es.gold_texts(q)))
                if judge is not None and q.answers:
                    graded = judge.score_0_5(q.question, q.answers, result.answer)
                    record["judge_reply"] = graded["judge_reply"]
                    scores["judge_score"] = graded["judge_score"]
                    scores.update(judge.ragas_llm_scores(q.question, result.answer, q.answers,
                                                         [c.text for c in result.contexts]))
                record["scores"] = scores
                records.append(record)
    return _finish("ab", evalset, records, ks, out_dir, command)


def as_answer_result(value: Any) -> AnswerResult:
    """Accept an AnswerResult or the tuple (answer, contexts, timings, tokens); contexts may be Context
    objects or (doc_id, text, score) tuples."""
    if isinstance(value, AnswerResult):
        result = value
    elif isinstance(value, tuple) and len(value) == 4:
        result = AnswerResult(*value)
    else:
        raise TypeError("an answer function must return AnswerResult or (answer, contexts, timings, tokens), "
                        f"got {type(value).__name__}")
    contexts = []
    for c in result.contexts:
        if isinstance(c, Context):
            contexts.append(c)
        elif isinstance(c, (tuple, list)) and len(c) == 3:
            contexts.append(Context(str(c[0]), str(c[1]), float(c[2])))
        else:
            raise TypeError(f"a context must be Context or (doc_id, text, score), got {c!r:.80}")
    return AnswerResult(str(result.answer), contexts, dict(result.timings or {}), dict(result.tokens or {}))


# ---------------------------------------------------------------- shared plumbing

def _memories(evalset, systems):
    if isinstance(evalset, EvalSet):
        yield evalset, systems(evalset) if callable(systems) and not isinstance(systems, dict) else systems
        return
    if isinstance(systems, dict):
        raise TypeError("several memories need a factory build_systems(evalset) -> {name: fn}, "
                        "since every memory has its own index")
    for es in evalset:
        yield es, systems(es)


def _as_retrieve_fn(fn) -> RetrieveFn:
    if hasattr(fn, "retrieve") and callable(fn.retrieve):
        return fn.retrieve
    if callable(fn):
        return fn
    raise TypeError(f"a retrieval system must be a function (question, k) or have .retrieve, got {type(fn).__name__}")


def _base_record(es: EvalSet, q: EvalQuestion, system: str) -> dict[str, Any]:
    return {"system": system, "dataset": es.name, "question_id": q.id, "question": q.question,
            "answers": q.answers, "gold_doc_ids": q.gold_doc_ids, "question_metadata": q.metadata,
            "memory_documents": len(es.documents),
            # the question already holds a reference answer: copying it from the question scores
            "answer_in_question": metrics.answer_in_question(q.question, q.answers)}


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def summarize(records: list[dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """Per system: mean of every score, latency summary, error count, mean recall@k curve, and NIAH
    string_match_all per memory size when the records carry NIAH metadata. Every mean is also given over
    the questions whose text does NOT already hold a reference answer (`metrics_answer_not_in_question`,
    with `answer_in_question`: how many were left out), and the headline answer metric is named."""
    systems: dict[str, Any] = {}
    for name in dict.fromkeys(r["system"] for r in records):
        own = [r for r in records if r["system"] == name]
        ok = [r for r in own if "error" not in r]
        clean = [r for r in ok if not r.get("answer_in_question")]
        curves = [r["recall_curve"] for r in ok if r.get("recall_curve") and r["recall_curve"][0] is not None]
        entry = {
            "questions": len(own),
            "errors": len(own) - len(ok),
            "metrics": metrics.mean_scores(r.get("scores", {}) for r in ok),
            "answer_in_question": sum(1 for r in own if r.get("answer_in_question")),
            "metrics_answer_not_in_question": metrics.mean_scores(r.get("scores", {}) for r in clean),
            "latency": metrics.latency_summary([r["latency_s"] for r in ok]),
            "recall_curve": ([sum(c[i] for c in curves) / len(curves) for i in range(CURVE_MAX_K)]
                             if curves else []),
        }
        niah = {}
        for r in ok:
            size = r["question_metadata"].get("memory_tokens")
            if size is not None and "string_match_all" in r.get("scores", {}):
                niah.setdefault(size, []).append(r["scores"]["string_match_all"])
        if niah:
            entry["niah_accuracy_by_memory_tokens"] = {str(s): sum(v) / len(v) for s, v in sorted(niah.items())}
        systems[name] = entry
    answered = any(metrics.HEADLINE_ANSWER_METRIC in e["metrics"] for e in systems.values())
    return {"ks": list(ks), "systems": systems,
            "headline_answer_metric": metrics.HEADLINE_ANSWER_METRIC if answered else None}


def _finish(kind, evalset, records, ks, out_dir, command) -> RunResult:
    evalsets = [evalset] if isinstance(evalset, EvalSet) else list(evalset)
    summary = {"kind": kind, "datasets": [es.summary() for es in evalsets], **summarize(records, ks)}
    if out_dir is not None:
        from . import report

        out_dir = str(report.write_report(out_dir, records, summary, command=command))
    return RunResult(records, summary, out_dir)
