"""Two tenants on one engine (Chroma's shape: one collection per tenant), plus agent memories on the same
engine. Swap: ChromaVectorStore(chroma_collection=...) -> MSAVectorStore(engine, collection_name=...)."""

import asyncio

from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage

from msa_plugins.integrations.llama_index import MSAMemoryBlock, MSAVectorStore, NoEmbedding


def _index(engine, tenant, docs):
    store = MSAVectorStore(engine, collection_name=tenant)
    return VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(vector_store=store),
                                           embed_model=NoEmbedding())


def test_tenants_never_see_each_other(engine, docs):
    acme = _index(engine, "acme", docs[:2])
    globex = _index(engine, "globex", [Document(text="Ana's bank PIN is 4321.", id_="pin.txt")])
    block = MSAMemoryBlock(name="memory", engine=engine, scope="ana")
    asyncio.run(block.aput([ChatMessage(role="user", content="My locker code is 7788.")]))

    question = "What is Ana's bank PIN or locker code?"
    acme_sources = acme.as_retriever(similarity_top_k=5).retrieve(question)
    assert {n.node.ref_doc_id for n in acme_sources} == {"france.txt", "alice.txt"}
    globex_sources = globex.as_retriever(similarity_top_k=5).retrieve(question)
    assert [n.node.ref_doc_id for n in globex_sources] == ["pin.txt"]
    assert all("7788" not in n.node.get_content() for n in acme_sources + globex_sources)
    assert engine.retrieve(question, k=5) == []  # the engine's default collection holds none of them
    # deleting a tenant's document never touches the other's
    acme.delete_ref_doc("alice.txt")
    assert [n.node.ref_doc_id for n in globex.as_retriever().retrieve(question)] == ["pin.txt"]
