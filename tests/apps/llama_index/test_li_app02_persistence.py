"""Persistence round trip: storage_context.persist -> load (documented swap: load_msa_index), refresh_ref_docs;
LlamaIndex's unchanged loader fails loudly, naming load_msa_index (never an empty index)."""

import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex, load_index_from_storage

from msa_plugins import MSAEngine
from msa_plugins.integrations.llama_index import MSALLM, MSAVectorStore, NoEmbedding, load_msa_index


def test_persist_and_load(engine, docs, app_model_dir, tmp_path):
    storage_context = StorageContext.from_defaults(vector_store=MSAVectorStore(engine))
    index = VectorStoreIndex.from_documents(docs, storage_context=storage_context, embed_model=NoEmbedding())
    index.storage_context.persist(persist_dir=str(tmp_path))
    before = [n.node_id for n in index.as_retriever().retrieve("Who is a painter?")]

    with pytest.raises(ValueError, match="load_msa_index"):
        load_index_from_storage(StorageContext.from_defaults(persist_dir=str(tmp_path)))

    fresh = MSAEngine.from_pretrained(app_model_dir, device="cpu", max_new_tokens=4)
    fresh.add(["A note the user added before loading."])
    with pytest.raises(ValueError, match="replace=True"):  # loading never replaces an engine's memory unasked
        load_msa_index(str(tmp_path), fresh)
    assert len(fresh) == 1

    other = MSAEngine.from_pretrained(app_model_dir, device="cpu", max_new_tokens=4)
    loaded = load_msa_index(str(tmp_path), other)
    assert [n.node_id for n in loaded.as_retriever().retrieve("Who is a painter?")] == before
    changed = Document(text="Alice was born in 1990 in Porto.", id_="alice.txt", metadata=docs[1].metadata)
    assert loaded.refresh_ref_docs([docs[0], changed]) == [False, True]
    assert [n.get_content() for n in loaded.vector_store.get_nodes()
            if n.ref_doc_id == "alice.txt"] == ["Alice was born in 1990 in Porto."]
    response = loaded.as_query_engine(llm=MSALLM(other)).query("Where was Alice born?")
    assert response.source_nodes
