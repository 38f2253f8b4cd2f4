"""Vector-store knobs as a LangChain user turns them: search types, MMR, thresholds, filters, async, by-id."""

import asyncio

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding

from msa_plugins import InvalidArgumentError, InvalidTypeError
from msa_plugins.integrations.langchain import MSAVectorStore


def test_search_types_filters_and_thresholds(engine, documents):
    store = MSAVectorStore(engine)  # MSA (was: InMemoryVectorStore(embeddings))
    store.add_documents(documents)
    sim = store.similarity_search_with_score("Who repairs bicycles?", k=4)
    assert len(sim) == 4 and [s for _, s in sim] == sorted((s for _, s in sim), reverse=True)
    rel = store.similarity_search_with_relevance_scores("Who repairs bicycles?", k=4)
    # relevance = routing cosine clipped to [0, 1], same order
    assert [d.id for d, _ in rel] == [d.id for d, _ in sim]
    assert [r for _, r in rel] == pytest.approx([min(1.0, max(0.0, s)) for _, s in sim])
    cut = sorted(r for _, r in rel)[1]  # keeps the documents at or above the second-lowest relevance
    kept = store.as_retriever(search_type="similarity_score_threshold",
                              search_kwargs={"k": 4, "score_threshold": cut}).invoke("Who repairs bicycles?")
    assert [d.id for d in kept] == [d.id for d, r in rel if r >= cut]
    assert store.similarity_search_with_relevance_scores("Who repairs bicycles?", k=4, score_threshold=1.01) == []
    # filters: dict, operators, callable
    assert {d.id for d in store.similarity_search("bread?", k=4, filter={"source": "bakery.txt"})} == {"bakery"}
    assert {d.id for d in store.as_retriever(search_kwargs={"k": 4, "filter": {"year": {"$in": [2019, 2020]}}})
            .invoke("anything?")} == {"bakery", "chess"}
    assert {d.id for d in store.similarity_search("q?", k=4, filter=lambda d: "river" in d.page_content)} == {"garden"}
    # async and batch
    assert [d.id for d in asyncio.run(store.asimilarity_search("Who repairs bicycles?", k=4))] == [d.id for d, _ in sim]
    assert len(store.as_retriever(search_kwargs={"k": 1}).batch(["a?", "b?"])) == 2
    assert [d.id for d in store.get_by_ids(["chess", "nope"])] == ["chess"]


def test_mmr_prefers_diverse_documents(engine):
    store = MSAVectorStore(engine)
    dup = "The robot Tilly repairs bicycles in the harbour workshop every Tuesday."
    store.add_texts([dup, dup + " ", dup + "  ", "Rye bread with caraway seeds is sold on Elm Street today."],
                    ids=["a", "b", "c", "d"])
    plain = store.similarity_search("bicycles", k=4)
    relevant_first = [d.id for d in plain]
    mmr = store.max_marginal_relevance_search("bicycles", k=2, fetch_k=4, lambda_mult=0.3)
    # the first pick is the most relevant; the other is never a near-copy of it (the random test router
    # ranks arbitrarily, so either the odd text or one copy comes first)
    assert mmr[0].id == relevant_first[0] and "d" in {mmr[0].id, mmr[1].id}
    only_relevance = store.max_marginal_relevance_search("bicycles", k=2, fetch_k=4, lambda_mult=1.0)
    assert [d.id for d in only_relevance] == relevant_first[:2]
    via_retriever = store.as_retriever(search_type="mmr", search_kwargs={"k": 2, "fetch_k": 4, "lambda_mult": 0.3})
    assert [d.id for d in via_retriever.invoke("bicycles")] == [d.id for d in mmr]
    with pytest.raises(InvalidArgumentError, match="lambda_mult"):
        store.max_marginal_relevance_search("bicycles", lambda_mult=1.5)


def test_no_silent_knobs_and_the_literal_class_swap(engine):
    store = MSAVectorStore(engine)
    store.add_texts(["Some text about bicycles and workshops."], ids=["x"])
    with pytest.raises(InvalidArgumentError, match="similarity_score_threshold"):
        store.similarity_search("q?", score_threshold=0.5)  # a threshold with search_type="similarity"
    with pytest.raises(InvalidArgumentError, match="search_type='mmr'"):
        store.as_retriever(search_kwargs={"fetch_k": 10}).invoke("q?")
    with pytest.raises(InvalidArgumentError, match="unknown argument"):
        store.similarity_search("q?", k=1, namespace="x")
    with pytest.raises(NotImplementedError, match="similarity_search\\(query\\)"):
        store.similarity_search_by_vector([0.1, 0.2])
    with pytest.raises(NotImplementedError, match="max_marginal_relevance_search\\(query\\)"):
        store.max_marginal_relevance_search_by_vector([0.1, 0.2])
    with pytest.raises(InvalidArgumentError, match="k must be"):
        store.similarity_search("q?", k=0)
    # the literal swap InMemoryVectorStore(embeddings) -> MSAVectorStore(embeddings) fails at construction
    with pytest.raises(InvalidTypeError, match="MSAVectorStore\\(engine"):
        MSAVectorStore(DeterministicFakeEmbedding(size=8))
    with pytest.raises(InvalidTypeError, match="collection_name="):
        MSAVectorStore("my_collection")
    with pytest.warns(UserWarning, match="ignores `embedding`"):
        MSAVectorStore.from_documents([Document(page_content="x y z", id="y")], DeterministicFakeEmbedding(size=8),
                                      engine=engine)
