"""IngestionPipeline(vector_store=..., docstore=..., docstore_strategy=UPSERTS) -> VectorStoreIndex.from_vector_store.
Swap: the embed step (NoEmbedding) and the vector store."""

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.storage.docstore import SimpleDocumentStore

from msa_plugins.integrations.llama_index import MSALLM, MSAVectorStore, NoEmbedding


def test_ingestion_pipeline_with_upserts(engine, docs):
    vector_store = MSAVectorStore(engine)
    pipeline = IngestionPipeline(
        transformations=[SentenceSplitter(chunk_size=32, chunk_overlap=0), NoEmbedding()],
        docstore=SimpleDocumentStore(), vector_store=vector_store, docstore_strategy=DocstoreStrategy.UPSERTS)
    first = pipeline.run(documents=docs)
    assert first and len(engine) == len(first)  # every node reached the engine

    changed = Document(text="Alice was born in 1990 in Porto and works as a sculptor.", id_="alice.txt",
                       metadata=docs[1].metadata)
    second = pipeline.run(documents=[docs[0], changed])
    assert [n.ref_doc_id for n in second] == ["alice.txt"]  # unchanged documents are skipped
    alice = [n.get_content() for n in vector_store.get_nodes() if n.ref_doc_id == "alice.txt"]
    assert any("Porto" in t for t in alice)
    assert not any("Lisbon" in t for t in alice)  # the old nodes were deleted, not duplicated
    assert len(engine) == len(vector_store.get_nodes())

    index = VectorStoreIndex.from_vector_store(vector_store, embed_model=NoEmbedding())
    response = index.as_query_engine(llm=MSALLM(engine)).query("Where was Alice born?")
    assert len(response.source_nodes) == 2

    index.delete_ref_doc("fox.txt")
    assert all(n.ref_doc_id != "fox.txt" for n in vector_store.get_nodes())
