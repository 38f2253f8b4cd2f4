"""LlamaIndex surfaces for an `MSAEngine`: a drop-in for `VectorStoreIndex` and friends.

    # before                                               # after
    index = VectorStoreIndex.from_documents(docs,          index = MSAIndex.from_documents(docs, engine=engine)
                embed_model=embed)
    qe = index.as_query_engine(llm=llm)                    qe = index.as_query_engine()
    index.storage_context.persist("storage")               index.storage_context.persist("storage")
    load_index_from_storage(StorageContext.from_defaults(  load_msa_index("storage", engine)
        persist_dir="storage"), embed_model=embed)

Answering is retriever-free: the model's router picks the documents (`Response.source_nodes`, routing
order, routing scores). `MetadataFilters` restrict the documents before routing. Modules follow the
LlamaIndex integration-package shape: `indices`, `retrievers`, `query_engine`, `llms`, `memory`, `filters`.
Everything here stands on the public `msa_plugins` API only.
"""

from .filters import filters_to_allow_ids, filters_to_predicate
from .indices import MSAIndex, MSAMemoryVectorStore, load_msa_index
from .llms import MSALLM
from .memory import MSAMemoryBlock
from .query_engine import MSAQueryEngine
from .retrievers import MSARetriever

__all__ = ["MSAIndex", "MSAQueryEngine", "MSARetriever", "MSALLM", "MSAMemoryBlock", "MSAMemoryVectorStore",
           "load_msa_index", "filters_to_allow_ids", "filters_to_predicate"]
