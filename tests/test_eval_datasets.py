"""Loaders on the real files in ../shared/datasets (skipped when absent), the hand-made formats, NIAH."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msa_plugins.integrations.ragas import datasets as ds
from msa_plugins.integrations.ragas import niah

# The data root, independent of the directory pytest runs from; the loaders below that are called without
# data_root= read it from $MSA_DATASETS, which this module sets for its own tests.
DATA_ROOT = Path(os.environ.get("MSA_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")


@pytest.fixture(autouse=True)
def _data_root_env(monkeypatch):
    monkeypatch.setenv("MSA_DATASETS", str(DATA_ROOT))
needs_data = pytest.mark.skipif(
    not (DATA_ROOT / "hipporag_popqa").exists(),
    reason=f"evaluation data not found at {DATA_ROOT} (set MSA_DATASETS to the shared datasets folder)",
)


@needs_data
@pytest.mark.parametrize("loader, questions, documents", [
    (ds.load_popqa, 1000, 1475),
    (ds.load_hotpotqa_train100, 100, 994),
    (ds.load_musique_train100, 100, 1890),
    (ds.load_narrativeqa, 293, 4111),
])
def test_hipporag_loaders_counts(loader, questions, documents):
    es = loader()
    assert (len(es.questions), len(es.documents)) == (questions, documents)
    assert all(q.answers for q in es.questions)


@needs_data
def test_hipporag_gold_documents():
    popqa = ds.load_popqa()
    assert all(len(q.gold_doc_ids) == 2 for q in popqa.questions)
    first = popqa.questions[0]
    assert "politician" in first.answers  # possible_answers was a JSON string
    assert popqa.doc(first.gold_doc_ids[0]).memory_text().startswith("George Rankin\n")
    hotpot = ds.load_hotpotqa_train100()
    assert all(len(q.gold_doc_ids) == 2 for q in hotpot.questions)  # HotpotQA: two gold paragraphs each
    musique = ds.load_musique_train100()
    assert sum(len(q.gold_doc_ids) for q in musique.questions) == 237
    assert ds.load_narrativeqa().summary()["questions_with_gold"] == 0


@needs_data
def test_subsets_are_deterministic():
    a = ds.load_popqa(limit=20, seed=7)
    b = ds.load_popqa(limit=20, seed=7)
    c = ds.load_popqa(limit=20, seed=8)
    assert [q.id for q in a.questions] == [q.id for q in b.questions] != [q.id for q in c.questions]
    assert len(a.documents) == 1475  # the full corpus is kept by default
    assert [q.id for q in ds.load_popqa(limit=3).questions] == [q.id for q in ds.load_popqa().questions[:3]]
    small = ds.load_musique_train100(limit=5, seed=1, distractors=30)
    gold = {g for q in small.questions for g in q.gold_doc_ids}
    assert len(small.documents) == len(gold) + 30 and gold <= set(small.doc_ids)
    assert small.doc_ids == ds.load_musique_train100(limit=5, seed=1, distractors=30).doc_ids


@needs_data
def test_popqa_test_is_the_router_training_held_out_split():
    from msa_plugins.trainer import split_indices

    full = ds.load_popqa()
    train, dev, test = split_indices(len(full.questions), seed=0)  # what train_default_router.py trains on
    seen = {full.questions[i].id for i in train + dev}
    held = ds.load_popqa_test()
    assert (len(held.questions), len(held.documents)) == (400, 1475)
    assert not seen & {q.id for q in held.questions}
    sample = ds.load_popqa_test(limit=100, seed=0)
    assert len(sample.questions) == 100 and not seen & {q.id for q in sample.questions}
    assert ds.load_evalset("popqa_test", limit=5, seed=0).name == "popqa_test"


@needs_data
def test_locomo_turns_and_sessions():
    convs = ds.load_locomo()
    assert len(convs) == 10
    assert sum(len(c.questions) for c in convs) == 1540  # category 5 skipped
    assert sum(len(c.documents) for c in convs) == 5882
    assert sum(len(c.questions) for c in ds.load_locomo(categories=range(1, 6))) == 1986
    first = convs[0]
    assert first.doc("D1:5").text == ("[1:56 pm on 8 May, 2023] Caroline: [Caroline shared an image: a photo of a dog "
                                      "walking past a wall with a painting of a woman] The transgender stories were so "
                                      "inspiring! I was so happy and thankful for all the support.")
    q = first.questions[0]
    assert q.gold_doc_ids == ["D1:3"] and q.answers == ["7 May 2023"]
    sessions = ds.load_locomo(granularity="session", conversations=["conv-26"])
    assert len(sessions) == 1 and sessions[0].questions[0].gold_doc_ids == ["D1"]
    assert sum(len(c.documents) for c in ds.load_locomo(granularity="session")) == 272
    with pytest.raises(ValueError, match="granularity"):
        ds.load_locomo(granularity="word")


def test_missing_data_gives_a_clear_error(tmp_path):
    from msa_plugins.errors import DatasetNotFoundError, MSAError

    with pytest.raises(DatasetNotFoundError, match="MSA_DATASETS") as info:
        ds.load_popqa(data_root=tmp_path)
    assert isinstance(info.value, (MSAError, FileNotFoundError))


def test_default_data_root_is_the_env_var_else_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MSA_DATASETS", str(tmp_path / "mine"))
    assert ds.default_data_root() == tmp_path / "mine"
    monkeypatch.delenv("MSA_DATASETS")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert ds.default_data_root() == (tmp_path / "shared" / "datasets").resolve()


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n{not json\n')
    (tmp_path / "q.jsonl").write_text('{"question": "a?"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl: line 2 is not valid JSON"):
        ds.load_jsonl(tmp_path / "docs.jsonl", tmp_path / "q.jsonl")


def test_package_imports_without_data(tmp_path):
    code = "import msa_plugins.integrations.ragas as r, msa_plugins.integrations.ragas.niah, msa_plugins.integrations.ragas.datasets"
    env = {"MSA_DATASETS": str(tmp_path / "nowhere"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)


def test_msa_benchmark_format(tmp_path):
    memory = ["Alpha is a city.", "Beta is a river.", "Alpha is a city.", "Gamma is a mountain."]
    questions = [{"question": "What is Alpha?", "labels": ["Alpha is a city."], "answer": "a city"},
                 {"question": "What is Gamma?", "labels": ["Gamma is a mountain."], "answer": ["a mountain"]}]
    (tmp_path / "bench.json").write_text(json.dumps({"memory": memory, "questions": questions}))
    es = ds.load_msa_benchmark(tmp_path / "bench.json")
    # identical memory strings are both gold (the label cannot tell them apart)
    assert es.questions[0].gold_doc_ids == ["doc-000000", "doc-000002"]
    assert es.questions[1].gold_doc_ids == ["doc-000003"] and es.questions[1].answers == ["a mountain"]
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "memory.jsonl").write_text("\n".join(json.dumps(m) for m in memory))
    (folder / "questions.json").write_text(json.dumps(questions))
    assert ds.load_msa_benchmark(folder).questions[0].gold_doc_ids == ["doc-000000", "doc-000002"]
    questions[0]["labels"] = ["Alpha is a city"]  # not byte-identical
    (tmp_path / "bad.json").write_text(json.dumps({"memory": memory, "questions": questions}))
    with pytest.raises(ValueError, match="byte-identical"):
        ds.load_msa_benchmark(tmp_path / "bad.json")


def test_plain_jsonl(tmp_path):
    docs = [{"id": "a", "text": "apples are red"}, {"text": "bananas are yellow", "metadata": {"src": "x"}}]
    qs = [{"question": "colour of bananas?", "answers": ["yellow"], "gold_ids": ["1"]}]
    (tmp_path / "docs.jsonl").write_text("\n".join(map(json.dumps, docs)))
    (tmp_path / "q.jsonl").write_text("\n".join(map(json.dumps, qs)))
    es = ds.load_jsonl(tmp_path / "docs.jsonl", tmp_path / "q.jsonl", name="fruit")
    assert es.doc_ids == ["a", "1"] and es.questions[0].gold_doc_ids == ["1"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "?", "answers": [], "gold_ids": ["zzz"]}))
    with pytest.raises(ValueError, match="zzz"):
        ds.load_jsonl(tmp_path / "docs.jsonl", tmp_path / "bad.jsonl")


# ---------------------------------------------------------------- NIAH

needs_essays = pytest.mark.skipif(not (DATA_ROOT / "ruler_niah").exists(),
                                  reason=f"ruler_niah essays not found under {DATA_ROOT}")


@needs_essays
@pytest.mark.parametrize("task", sorted(niah.RULER_TASKS))
def test_niah_needles_are_in_the_gold_documents(task):
    es = niah.generate_niah(task, memory_tokens=32_000, doc_tokens=512, seed=3)
    q = es.questions[0]
    gold_text = " ".join(es.doc(g).text for g in q.gold_doc_ids)
    for value in q.answers:
        assert value in gold_text
    others = " ".join(d.text for d in es.documents if d.id not in q.gold_doc_ids)
    assert not any(v in others for v in q.answers)
    expected_values = niah.RULER_TASKS[task].num_queries * niah.RULER_TASKS[task].num_values
    assert len(q.answers) == expected_values
    assert 31_000 < es.metadata["haystack_tokens"] < 33_500


@needs_essays
def test_niah_is_deterministic_and_repeats_the_haystack():
    a = niah.generate_niah("multikey", 32_000, seed=5)
    b = niah.generate_niah("multikey", 32_000, seed=5)
    c = niah.generate_niah("multikey", 32_000, seed=6)
    assert [d.text for d in a.documents] == [d.text for d in b.documents]
    assert a.questions[0].answers == b.questions[0].answers != c.questions[0].answers
    # Haystack documents without needles are shared across samples (per-document caches reuse them).
    shared = {d.text for d in a.documents} & {d.text for d in c.documents}
    assert len(shared) >= len(a.documents) - 8
    big = niah.generate_niah("single", 400_000, doc_tokens=1024, seed=1)  # essays are ~160K tokens: repeated
    assert big.metadata["haystack_tokens"] >= 400_000 and len(big.documents) > 350


@needs_essays
def test_niah_uses_the_given_tokenizer():
    chars = niah.generate_niah("single", 50_000, doc_tokens=2_000, seed=1, tokenizer=len)  # 1 "token" per character
    assert all(len(d.text) < 2_000 + 200 for d in chars.documents)
    with pytest.raises(ValueError, match="unknown NIAH task"):
        niah.generate_niah("nope")
