"""LlamaIndex surfaces for an `MSAEngine`, through LlamaIndex's own extension points.

    # before                                                  # after
    index = VectorStoreIndex.from_documents(                  vector_store = MSAVectorStore(engine)
        docs, embed_model=embed)                              index = VectorStoreIndex.from_documents(
                                                                  docs, embed_model=NoEmbedding(),
                                                                  storage_context=StorageContext.from_defaults(
                                                                      vector_store=vector_store))
    qe = index.as_query_engine(llm=llm)                       qe = index.as_query_engine(llm=MSALLM(engine))

`MSAVectorStore` is a `BasePydanticVectorStore` that keeps text and routes on the query string with the
model's router (no embeddings); everything built on a vector store works on it. `MSAIndex` is a
`VectorStoreIndex` with those defaults wired and its kwargs checked. `MSALLM` is the model as a
`FunctionCallingLLM`; `MSAMemoryBlock` is long-term agent memory; `MSAQueryEngine` answers retriever-free
(MSA's sparse / protocol modes). Modules follow the LlamaIndex integration-package shape: `vector_stores`,
`indices`, `retrievers`, `query_engine`, `llms`, `memory`, `filters`. Everything here stands on the
public `msa_plugins` API only.
"""

from .filters import filters_to_allow_ids, filters_to_predicate
from .indices import MSAIndex, load_msa_index
from .llms import MSALLM, ToolCallError
from .memory import MSAMemoryBlock
from .query_engine import MSAQueryEngine
from .retrievers import MSARetriever
from .vector_stores import MSAVectorStore, NoEmbedding

__all__ = ["MSAVectorStore", "NoEmbedding", "MSAIndex", "MSAQueryEngine", "MSARetriever", "MSALLM", "ToolCallError",
           "MSAMemoryBlock", "load_msa_index", "filters_to_allow_ids", "filters_to_predicate"]
