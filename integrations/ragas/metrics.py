"""Metrics for the A/B runs: retrieval (recall@k, hit@k, MRR), latency, answer strings, RAGAS, LLM judge.

A "record" is the per-question dict the harness writes (see harness.py): it holds `gold_doc_ids`,
`retrieved` ([{"doc_id", "score", "text"?}] best first), `answers` (references), `answer` (prediction,
None for retrieval-only runs) and timings.

RAGAS 0.4.3 is imported only through `import_ragas()` (see its docstring for why).
"""
from __future__ import annotations

import asyncio
import math
import os
import re
import string
import sys
import types
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from msa_plugins.errors import InvalidArgumentError
# recall@k, hit@k, all@k, MRR and their means have one implementation, shared with router training
# (standard library only); re-exported here so the harness reads every metric from this module.
from msa_plugins.metrics import (all_at_k, hit_at_k, mean_scores, reciprocal_rank,  # noqa: F401
                                 recall_at_k, retrieval_scores)

# ---------------------------------------------------------------- retrieval

def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p95 (nearest-rank), mean and max of per-question latencies, in seconds."""
    if not seconds:
        return {"n": 0}
    ordered = sorted(seconds)
    n = len(ordered)
    p95_index = max(0, math.ceil(0.95 * n) - 1)
    middle = n // 2
    median = ordered[middle] if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"n": n, "median_s": median, "p95_s": ordered[p95_index], "mean_s": sum(ordered) / n,
            "max_s": ordered[-1]}


# ---------------------------------------------------------------- answer strings (no LLM)

def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _contains_words(text: str, phrase: str) -> bool:
    """`phrase` occurs in `text` as whole words: never inside a longer word or number ("cat" is not in
    "concatenate", "1" is not in "1990"). Both are compared as given (normalise them first if wanted)."""
    return bool(phrase) and re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text) is not None


def answer_contains(prediction: str, references: Sequence[str]) -> float:
    """1.0 when any normalised reference occurs in the normalised prediction as whole words (PopQA-style
    accuracy, word-bounded: "Paris" counts in "It is Paris.", "cat" does not count in "concatenate").
    The headline answer metric of `msa eval`."""
    pred = normalize_answer(prediction)
    return 1.0 if any(_contains_words(pred, normalize_answer(r)) for r in references) else 0.0


def string_presence_words(prediction: str, references: Sequence[str]) -> float:
    """RAGAS's StringPresence rule (a stripped reference appears in the stripped response, case as
    written, best over the references) with word boundaries: reported beside `ragas_string_presence`,
    whose plain substring test credits "1" inside "1990"."""
    pred = prediction.strip()
    return 1.0 if any(_contains_words(pred, r.strip()) for r in references) else 0.0


def answer_in_question(question: str, references: Sequence[str]) -> bool:
    """The question's own text already holds one of its reference answers (normalised, as whole words):
    an answer a model can copy from the question without reading any document."""
    q = normalize_answer(question)
    return any(_contains_words(q, normalize_answer(r)) for r in references)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best SQuAD token F1 against any reference (LoCoMo / HotpotQA style)."""
    best = 0.0
    pred_tokens = normalize_answer(prediction).split()
    for ref in references:
        ref_tokens = normalize_answer(ref).split()
        common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_tokens), common / len(ref_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER NIAH metric: fraction of the gold values present (case-insensitive) in the prediction."""
    if not references:
        return 0.0
    pred = prediction.lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


# The answer metric a summary leads with: word-bounded, so a substring inside a word earns nothing.
HEADLINE_ANSWER_METRIC = "answer_contains"


def answer_scores(prediction: str | None, references: Sequence[str]) -> dict[str, float | None]:
    if prediction is None or not references:
        return {}
    return {"answer_contains": answer_contains(prediction, references),
            "string_presence_words": string_presence_words(prediction, references),
            "token_f1": token_f1(prediction, references),
            "string_match_all": string_match_all(prediction, references)}


# ---------------------------------------------------------------- RAGAS

_VERTEXAI_MODULE = "langchain_community.chat_models.vertexai"


def import_ragas():
    """Import ragas 0.4.3 offline and without telemetry; returns the `ragas` module.

    Why the placeholder: `ragas.llms.base` does `from langchain_community.chat_models.vertexai import
    ChatVertexAI`, a module langchain-community 0.4.2 removed (upstream ragas issues #2745/#2753/#2995, no
    fixed release). The `eval` extra pins langchain-community 0.4.1, which still has it, so a plain
    `import ragas` works there (tests/test_packaging.py); the placeholder only helps a user who has 0.4.2.
    ragas uses the class only in an isinstance() list of Vertex models, so registering an empty module with
    a never-instantiated placeholder class restores the import without changing any behaviour we use. When
    the real module exists it is left alone.

    Why RAGAS_DO_NOT_TRACK: ragas otherwise posts usage telemetry on evaluation calls. We force "true"
    (the instrument must never reach the network) and clear ragas's cached reading of the variable.
    """
    os.environ["RAGAS_DO_NOT_TRACK"] = "true"
    if _VERTEXAI_MODULE not in sys.modules:
        try:
            __import__(_VERTEXAI_MODULE)
        except ImportError:
            placeholder = types.ModuleType(_VERTEXAI_MODULE)

            class ChatVertexAI:  # never instantiated: only named in an isinstance() tuple inside ragas
                """Placeholder for the class langchain-community 0.4.2 removed."""

            placeholder.ChatVertexAI = ChatVertexAI
            sys.modules[_VERTEXAI_MODULE] = placeholder
    import ragas
    from ragas import _analytics

    _analytics.do_not_track.cache_clear()  # in case ragas was imported before the variable was set
    return ragas


def ragas_non_llm_scores(
    question: str,
    response: str | None,
    references: Sequence[str],
    retrieved_contexts: Sequence[str],
    reference_contexts: Sequence[str],
) -> dict[str, float | None]:
    """RAGAS's offline metrics for one question.

    Context metrics compare retrieved texts to the gold document texts (reference contexts) by string
    similarity; they need gold documents. Answer metrics (StringPresence, ExactMatch, RougeScore) take
    the best score over the reference answers, since our datasets give several aliases.
    """
    import_ragas()
    from ragas.dataset_schema import SingleTurnSample

    with warnings.catch_warnings():
        # The legacy module is deprecated, but the two NonLLM context metrics exist only there.
        warnings.simplefilter("ignore", DeprecationWarning)
        from ragas.metrics import (ExactMatch, NonLLMContextPrecisionWithReference, NonLLMContextRecall,
                                   RougeScore, StringPresence)

    scores: dict[str, float | None] = {}
    if reference_contexts:
        retrieved = list(retrieved_contexts) or [""]  # ragas takes max() over retrieved: needs one item
        sample = SingleTurnSample(user_input=question, retrieved_contexts=retrieved,
                                  reference_contexts=list(reference_contexts))
        scores["ragas_context_recall"] = NonLLMContextRecall().single_turn_score(sample)
        scores["ragas_context_precision"] = (NonLLMContextPrecisionWithReference().single_turn_score(sample)
                                             if retrieved_contexts else 0.0)
    if response is not None and references:
        for name, metric in (("ragas_string_presence", StringPresence()), ("ragas_exact_match", ExactMatch()),
                             ("ragas_rouge_l", RougeScore())):
            scores[name] = max(
                metric.single_turn_score(SingleTurnSample(user_input=question, response=response.strip(),
                                                          reference=ref.strip()))
                for ref in references)
    return scores


# ---------------------------------------------------------------- LLM judge (only when configured)

JUDGE_PROMPT_0_5 = """You are grading an answer to a question against reference answers.
Score the answer on a 0-5 scale:
5 = fully correct and complete, consistent with the references;
4 = correct, with minor omissions or extra detail that does not contradict the references;
3 = partially correct: the key fact is present but part of the answer is missing or imprecise;
2 = mostly incorrect, with only a small correct element;
1 = incorrect but on topic;
0 = wrong, irrelevant, or no answer / refusal when the references give an answer.
Judge meaning, not wording. Reply with one short reason, then a last line "Score: <0-5>".

Question: {question}
Reference answers: {references}
Answer to grade: {prediction}
"""

_SCORE_LINE = re.compile(r"score[\s:=*]*([0-5](?:\.\d+)?)(?![\d.])", re.IGNORECASE)
_BARE_NUMBER = re.compile(r"(?<![\d.])([0-5](?:\.\d+)?)(?:\s*/\s*5)?(?![\d.])")


def parse_judge_score(text: str) -> float | None:
    """The 0-5 score in a judge reply: the last "Score: x" if present, else a reply that is only a
    number (optionally "x/5" or bold); None when no score in range can be read."""
    if not text:
        return None
    matches = _SCORE_LINE.findall(text)
    if matches:
        return float(matches[-1])
    stripped = text.strip().strip("*").strip()
    m = _BARE_NUMBER.fullmatch(stripped)
    return float(m.group(1)) if m else None


@dataclass
class Judge:
    """An LLM judge: an OpenAI-compatible endpoint (base_url + model [+ api_key]) or a LangChain chat
    model. Nothing here runs unless a Judge is built and passed explicitly: no default endpoint."""

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    chat_model: Any = None
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.chat_model is None and not (self.base_url and self.model):
            raise InvalidArgumentError("Judge needs either chat_model= (LangChain) or base_url= and model= (OpenAI-compatible)")

    def complete(self, prompt: str) -> str:
        if self.chat_model is not None:
            reply = self.chat_model.invoke(prompt)
            return reply.content if hasattr(reply, "content") else str(reply)
        from openai import OpenAI

        client = OpenAI(base_url=self.base_url, api_key=self.api_key or os.environ.get("OPENAI_API_KEY", "none"))
        out = client.chat.completions.create(model=self.model, temperature=self.temperature,
                                             messages=[{"role": "user", "content": prompt}])
        return out.choices[0].message.content or ""

    def score_0_5(self, question: str, references: Sequence[str], prediction: str) -> dict[str, Any]:
        """The MSA-paper style 0-5 grade (our own wording of such a rubric, not the authors' prompt)."""
        reply = self.complete(JUDGE_PROMPT_0_5.format(question=question, references=" | ".join(references),
                                                      prediction=prediction))
        return {"judge_score": parse_judge_score(reply), "judge_reply": reply}

    def ragas_llm_scores(self, question: str, response: str, references: Sequence[str],
                         retrieved_contexts: Sequence[str]) -> dict[str, float | None]:
        """RAGAS faithfulness (answer vs retrieved contexts) and answer correctness (factuality only:
        weights [1, 0], so no embedding model is needed)."""
        import_ragas()
        reference = references[0] if references else ""
        if self.chat_model is not None:
            # The modern `collections` metrics accept only instructor LLMs; a LangChain model goes
            # through the legacy metrics and their LangChain wrapper.
            from ragas.dataset_schema import SingleTurnSample
            from ragas.llms import LangchainLLMWrapper
            from ragas.metrics import AnswerCorrectness, Faithfulness

            llm = LangchainLLMWrapper(self.chat_model)
            sample = SingleTurnSample(user_input=question, response=response, reference=reference,
                                      retrieved_contexts=list(retrieved_contexts))
            return {"ragas_faithfulness": Faithfulness(llm=llm).single_turn_score(sample),
                    "ragas_answer_correctness": AnswerCorrectness(llm=llm, weights=[1.0, 0.0]).single_turn_score(sample)}
        from openai import AsyncOpenAI
        from ragas.llms import llm_factory
        from ragas.metrics.collections import AnswerCorrectness, Faithfulness

        client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or os.environ.get("OPENAI_API_KEY", "none"))
        llm = llm_factory(self.model, client=client)

        async def both():
            faith = await Faithfulness(llm=llm).ascore(user_input=question, response=response,
                                                       retrieved_contexts=list(retrieved_contexts))
            correct = await AnswerCorrectness(llm=llm, weights=[1.0, 0.0]).ascore(
                user_input=question, response=response, reference=reference)
            return {"ragas_faithfulness": faith.value, "ragas_answer_correctness": correct.value}

        return asyncio.run(both())
