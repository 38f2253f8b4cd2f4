"""Two tenants on one engine: each MSAVectorStore collection (Chroma's shape) sees only its own documents."""

import pytest

from msa_plugins import DuplicateIdError
from msa_plugins.integrations.langchain import ChatMSA, MSARetriever, MSAVectorStore


def test_two_collections_are_isolated(engine):
    # a = Chroma(collection_name="tenant-a", embedding_function=emb); b = Chroma(collection_name="tenant-b", ...)
    a = MSAVectorStore(engine, collection_name="tenant-a")  # MSA
    b = MSAVectorStore(engine, collection_name="tenant-b")  # MSA
    a.add_texts(["Tenant A's invoice 17 is due on Monday.", "Tenant A ships bicycles."], ids=["a1", "a2"])
    b.add_texts(["Tenant B's invoice 99 is overdue.", "Tenant B bakes rye bread."], ids=["b1", "b2"])
    assert {d.id for d in a.similarity_search("Which invoice is due?", k=10)} == {"a1", "a2"}
    assert {d.id for d in b.similarity_search("Which invoice is due?", k=10)} == {"b1", "b2"}
    assert a.get_by_ids(["b1", "a1"])[0].id == "a1" and len(a.get_by_ids(["b1"])) == 0
    a.delete(["b1"])  # another collection's id: not this store's, nothing deleted
    assert [d.id for d in b.get_by_ids(["b1"])] == ["b1"]
    with pytest.raises(DuplicateIdError, match="b1"):  # ids are unique across the memory
        a.add_texts(["clash"], ids=["b1"])
    # re-adding the corpus to a second store of the same collection replaces, never duplicates
    MSAVectorStore(engine, collection_name="tenant-a").add_texts(["Tenant A ships bicycles."], ids=["a2"])
    assert len(a.similarity_search("bicycles", k=10)) == 2
    # readers take the collection too
    assert {d.id for d in MSARetriever(engine=engine, collection="tenant-b", k=5).invoke("invoice?")} == {"b1", "b2"}
    msg = ChatMSA(engine=engine, collection="tenant-a", k=5, max_tokens=2).invoke("Which invoice is due?")
    assert {d["id"] for d in msg.response_metadata["documents"]} == {"a1", "a2"}
    assert ChatMSA(engine=engine, max_tokens=2).invoke("invoice?").response_metadata["memory"].startswith("skipped")
