"""Metrics, RAGAS wrappers, judge parsing, harness and report files, on hand-made cases."""
import json
import math
import os

import pytest

from msa_plugins.integrations.ragas import metrics
from msa_plugins.integrations.ragas.datasets import EvalDoc, EvalQuestion, EvalSet
from msa_plugins.integrations.ragas.harness import AnswerResult, Context, as_answer_result, run_ab_eval, run_retrieval_eval


def test_recall_hit_all_mrr_exact_values():
    retrieved = ["d3", "d1", "d7", "d2", "d9"]
    gold = ["d1", "d2"]
    assert metrics.recall_at_k(retrieved, gold, 1) == 0.0
    assert metrics.recall_at_k(retrieved, gold, 2) == 0.5
    assert metrics.recall_at_k(retrieved, gold, 4) == 1.0
    assert metrics.hit_at_k(retrieved, gold, 1) == 0.0
    assert metrics.hit_at_k(retrieved, gold, 2) == 1.0
    assert metrics.all_at_k(retrieved, gold, 3) == 0.0
    assert metrics.all_at_k(retrieved, gold, 4) == 1.0
    assert metrics.reciprocal_rank(retrieved, gold) == 0.5
    assert metrics.reciprocal_rank(["x", "y"], gold) == 0.0
    # No gold documents (NarrativeQA): not applicable, not zero.
    assert metrics.recall_at_k(retrieved, [], 5) is None
    assert metrics.reciprocal_rank(retrieved, []) is None


def test_mean_scores_skips_undefined_values():
    per_question = [{"mrr": 1.0, "recall@1": 1.0}, {"mrr": 0.25, "recall@1": None}, {"mrr": None}]
    assert metrics.mean_scores(per_question) == {"mrr": 0.625, "recall@1": 1.0}
    assert metrics.mean_scores([{"x": float("nan")}, {"x": 0.5}]) == {"x": 0.5}


def test_latency_summary_median_and_p95():
    summary = metrics.latency_summary([float(i) for i in range(1, 21)])  # 1..20 s
    assert summary["median_s"] == 10.5
    assert summary["p95_s"] == 19.0  # nearest rank: ceil(0.95 * 20) = 19th value
    assert summary["max_s"] == 20.0 and summary["n"] == 20
    assert metrics.latency_summary([3.0])["median_s"] == 3.0
    assert metrics.latency_summary([]) == {"n": 0}


def test_answer_string_metrics():
    assert metrics.answer_contains("He was a Politician, mostly.", ["political leader", "politician"]) == 1.0
    assert metrics.answer_contains("a farmer", ["politician"]) == 0.0
    # "the cat sat" vs "cat sat down": normalised tokens [cat, sat] vs [cat, sat, down] -> P=1, R=2/3
    assert math.isclose(metrics.token_f1("the cat sat", ["cat sat down"]), 0.8)
    assert metrics.string_match_all("values: 1234567 and 7654321", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("prediction, references, expected", [
    ("concatenate", ["cat"], 0.0),            # never inside a longer word
    ("The cat sat.", ["cat"], 1.0),
    ("She was born in 1990.", ["1"], 0.0),    # nor inside a longer number
    ("1 apple", ["1"], 1.0),
    ("In 1990.", ["1990"], 1.0),
    ("It is Paris.", ["paris"], 1.0),         # normalised: case and punctuation do not matter
    ("A Parisian café", ["Paris"], 0.0),
    ("He moved to New York City", ["new york"], 1.0),  # several words, as a phrase
    ("york new", ["new york"], 0.0),
    ("anything", [""], 0.0),                  # an empty reference credits nothing
])
def test_answer_contains_is_word_bounded(prediction, references, expected):
    assert metrics.answer_contains(prediction, references) == expected


def test_string_presence_words_beside_ragas_string_presence():
    # RAGAS's StringPresence is a plain substring test and stays exactly that, under its own name;
    # ours applies the same rule (case as written) with word boundaries
    scores = metrics.ragas_non_llm_scores("When was she born?", "She was born in 1990.", ["1"], [], [])
    assert scores["ragas_string_presence"] == 1.0
    assert metrics.string_presence_words("She was born in 1990.", ["1"]) == 0.0
    assert metrics.string_presence_words("She was born in 1990.", ["1990", "x"]) == 1.0
    assert metrics.string_presence_words("paris", ["Paris"]) == 0.0  # case as written, like RAGAS's rule
    assert metrics.answer_scores("born in 1990", ["1"])["string_presence_words"] == 0.0


@pytest.mark.parametrize("question, answers, flagged", [
    ("Is Paris the capital of France?", ["Paris"], True),
    ("What is the capital of France?", ["Paris"], False),
    ("Who wrote Catch-22?", ["cat"], False),          # not inside a word
    ("In which year, 1990 or 1991, was she born?", ["1990"], True),
    ("What is George Rankin's occupation?", ["politician", "George"], True),  # any reference counts
])
def test_answer_in_question(question, answers, flagged):
    assert metrics.answer_in_question(question, answers) is flagged


def test_summary_and_report_split_off_questions_that_contain_their_answer(tmp_path):
    docs = [EvalDoc("d1", "Paris is in France."), EvalDoc("d2", "Berlin is in Germany.")]
    questions = [EvalQuestion("q1", "Is Paris the capital of France?", ["Paris"], ["d1"]),  # answer in question
                 EvalQuestion("q2", "What is the capital of Germany?", ["Berlin"], ["d2"]),
                 EvalQuestion("q3", "Which city is in France?", ["Paris"], ["d1"])]
    es = EvalSet("copy", docs, questions)

    def parrot(question):  # answers with the first capitalised word after the first: copies from the question
        words = [w.strip("?") for w in question.split()[1:] if w[:1].isupper()]
        return AnswerResult(words[0] if words else "", [Context("d1", "Paris is in France.", 1.0)])

    result = run_ab_eval(es, {"A": parrot}, ks=(1,), ragas_metrics=False, out_dir=tmp_path, progress=False)
    assert [r["answer_in_question"] for r in result.records] == [True, False, False]
    a = result.summary["systems"]["A"]
    assert a["answer_in_question"] == 1
    assert a["metrics"]["answer_contains"] == pytest.approx(1 / 3)  # only the copied answer scores
    assert a["metrics_answer_not_in_question"]["answer_contains"] == 0.0
    assert a["metrics_answer_not_in_question"]["recall@1"] == 0.5  # every metric, on q2 and q3
    assert result.summary["headline_answer_metric"] == "answer_contains"
    md = (tmp_path / "report.md").read_text()
    assert "**Headline: `answer_contains`**" in md
    assert "Questions that do not contain their answer (2 of 3; 1 flagged `answer_in_question`)" in md
    section = md.split("Questions that do not contain their answer")[1]
    assert "| answer_contains | 0.000 |" in section and "| recall@1 | 0.500 |" in section


@pytest.mark.parametrize("reply, expected", [
    ("The answer names the right city.\nScore: 4", 4.0),
    ("Reason: partially right. score: 3.5", 3.5),
    ("**Score:** **5**", 5.0),
    ("Score: 2/5", 2.0),
    ("first Score: 1, on reflection Score: 3", 3.0),
    ("4", 4.0),
    ("**0**", 0.0),
    ("3/5", 3.0),
    ("Score: 7", None),           # out of the 0-5 range
    ("I cannot grade this.", None),
    ("The answer mentions 1912 and 3 people.", None),  # numbers in prose are not a score
    ("", None),
])
def test_parse_judge_score(reply, expected):
    assert metrics.parse_judge_score(reply) == expected


def test_judge_needs_explicit_configuration():
    with pytest.raises(ValueError, match="chat_model"):
        metrics.Judge()
    assert "Score: <0-5>" in metrics.JUDGE_PROMPT_0_5


def test_import_ragas_works_and_telemetry_is_off():
    ragas = metrics.import_ragas()
    assert ragas.__version__.startswith("0.4")
    assert os.environ["RAGAS_DO_NOT_TRACK"] == "true"
    from ragas._analytics import do_not_track

    assert do_not_track() is True


def test_ragas_non_llm_metrics_on_a_tiny_record():
    paris = "Paris is the capital and largest city of France."
    scores = metrics.ragas_non_llm_scores(
        question="What is the capital of France?",
        response="Paris",
        references=["Paris", "City of Paris"],
        retrieved_contexts=[paris, "Berlin is the capital of Germany."],
        reference_contexts=[paris],
    )
    assert scores["ragas_context_recall"] == 1.0
    assert scores["ragas_context_precision"] == pytest.approx(1.0)  # the gold text is ranked first
    assert scores["ragas_exact_match"] == 1.0
    assert scores["ragas_string_presence"] == 1.0
    assert scores["ragas_rouge_l"] == 1.0
    missed = metrics.ragas_non_llm_scores("q", "Berlin", ["Paris"], ["Berlin is in Germany."], [paris])
    assert missed["ragas_context_recall"] == 0.0 and missed["ragas_exact_match"] == 0.0


# ---------------------------------------------------------------- harness + report

def _tiny_set(name="tiny", memory_tokens=None):
    docs = [EvalDoc(f"d{i}", f"document number {i}") for i in range(6)]
    meta = {} if memory_tokens is None else {"memory_tokens": memory_tokens}
    questions = [EvalQuestion("q1", "find d1", ["one"], ["d1"], dict(meta)),
                 EvalQuestion("q2", "find d2 and d4", ["two"], ["d2", "d4"], dict(meta))]
    return EvalSet(name, docs, questions)


def _perfect(question, k):  # a real retrieval function: reads the wanted ids out of the question
    wanted = [w for w in question.split() if w.startswith("d")]
    rest = [f"d{i}" for i in range(6) if f"d{i}" not in wanted]
    return [(d, 1.0 / (r + 1)) for r, d in enumerate(wanted + rest)][:k]


def _reversed(question, k):
    return list(reversed(_perfect(question, 6)))[:k]


def test_retrieval_harness_scores_and_report_files(tmp_path):
    result = run_retrieval_eval(_tiny_set(), {"A": _perfect, "B": _reversed}, ks=(1, 5),
                                out_dir=tmp_path / "run", command="pytest tiny", progress=False)
    a, b = result.summary["systems"]["A"]["metrics"], result.summary["systems"]["B"]["metrics"]
    assert a["recall@1"] == 0.75 and a["mrr"] == 1.0  # q1: 1/1, q2: 1/2 at k=1
    # B reverses: q1 -> [d5 d4 d3 d2 d0 d1], d1 6th (rr 1/6); q2 -> [d5 d3 d1 d0 d4 d2], d4 5th (rr 1/5)
    assert b["mrr"] == pytest.approx((1 / 6 + 1 / 5) / 2)
    assert result.summary["systems"]["A"]["recall_curve"][:2] == [0.75, 1.0]
    out = tmp_path / "run"
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["system"] == "A"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "pytest tiny"
    md = (out / "report.md").read_text()
    assert "pytest tiny" in md and "`B`/A" in md and "| mrr | 1.000 |" in md
    for png in ("metrics.png", "latency.png", "recall_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ab_harness_accepts_tuples_records_errors_and_draws_niah(tmp_path):
    def answer_tuple(question):
        ids = [d for d, _ in _perfect(question, 2)]
        return ("one" if "d1" in question else "no idea", [(i, f"document number {i[1:]}", 1.0) for i in ids], {"total_s": 0.0}, {})

    def broken(question):
        raise RuntimeError("engine down")

    sets = [_tiny_set("niah/a", 1000), _tiny_set("niah/b", 2000)]
    result = run_ab_eval(sets, lambda es: {"A": answer_tuple, "B": broken}, ks=(1, 2), ragas_metrics=False,
                         out_dir=tmp_path, command="pytest ab", progress=False)
    a = result.summary["systems"]["A"]
    assert a["metrics"]["answer_contains"] == 0.5 and a["metrics"]["recall@2"] == 1.0
    assert a["answer_in_question"] == 0 and a["metrics_answer_not_in_question"] == a["metrics"]
    assert "No question contains one of its own reference answers" in (tmp_path / "report.md").read_text()
    assert a["niah_accuracy_by_memory_tokens"] == {"1000": 0.5, "2000": 0.5}
    assert result.summary["systems"]["B"]["errors"] == 4
    assert (tmp_path / "niah.png").exists()
    with pytest.raises(TypeError, match="factory"):
        run_ab_eval(sets, {"A": answer_tuple}, progress=False)


def test_as_answer_result_validates_shapes():
    r = as_answer_result(("x", [("d1", "t", 0.5)], {}, {}))
    assert r.contexts == [Context("d1", "t", 0.5)]
    assert as_answer_result(AnswerResult("y")).answer == "y"
    with pytest.raises(TypeError):
        as_answer_result("just a string")
