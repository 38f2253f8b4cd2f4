"""The MSA seam: an MSAEngine (tiny random model) runs through the same harness as the RAG baselines.
Mechanics only: a random model routes at chance, so no quality is asserted."""
import pytest

from msa_plugins.integrations.ragas.datasets import EvalDoc, EvalQuestion, EvalSet
from msa_plugins.integrations.ragas.harness import run_ab_eval, run_retrieval_eval
from msa_plugins.integrations.ragas.msa_system import msa_answer_fn, msa_retrieve_fn


@pytest.fixture(scope="module")
def tiny_set():
    docs = [EvalDoc(f"doc{i}", f"Fact number {i}: the {w} is {c}.") for i, (w, c) in
            enumerate([("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("snow", "white")])]
    questions = [EvalQuestion("q0", "What colour is the sky?", ["blue"], ["doc0"]),
                 EvalQuestion("q1", "What colour is the grass?", ["green"], ["doc1"])]
    return EvalSet("colours", docs, questions)


def test_msa_engine_as_retrieval_and_answer_system(tiny_set, tiny_model_dir, tmp_path):
    from msa_plugins import MSAEngine

    engine = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", k=2)
    engine.add(tiny_set.memory_texts(), ids=tiny_set.doc_ids, progress=False)
    run = run_retrieval_eval(tiny_set, {"msa": msa_retrieve_fn(engine)}, ks=(1, 2), progress=False)
    assert run.summary["systems"]["msa"]["errors"] == 0
    for record in run.records:
        assert {r["doc_id"] for r in record["retrieved"]} <= set(tiny_set.doc_ids)
        assert len(record["retrieved"]) == 4  # asked for 20, the memory holds 4
    ab = run_ab_eval(tiny_set, {"msa": msa_answer_fn(engine, max_new_tokens=3)}, ks=(1, 2), ragas_metrics=False,
                     out_dir=tmp_path, command="pytest msa", progress=False)
    record = ab.records[0]
    assert "error" not in record, record.get("error")
    assert isinstance(record["answer"], str) and record["tokens"]["completion_tokens"] <= 3
    assert record["retrieved"] and record["retrieved"][0]["doc_id"] in tiny_set.doc_ids
    assert (tmp_path / "report.md").exists()
