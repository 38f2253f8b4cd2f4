"""`MSARetriever`: LlamaIndex's `BaseRetriever` straight over an engine's collection; the model's router
ranks (no embeddings, no index needed). Also the one place routed documents become `NodeWithScore`s
(the retriever-free query engine's sources use it too)."""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import MetadataFilters

from msa_plugins import MSAEngine, RoutedDocument
from msa_plugins.validation import check_text

from ._collections import DEFAULT_COLLECTION, check_collection
from .filters import filters_to_predicate
from .vector_stores import node_from_document

__all__ = ["MSARetriever"]


class MSARetriever(BaseRetriever):
    """Routes a query to the documents of one collection with the model's router.

    Nodes come back best first with their routing scores (layer-mean cosine). A document stored through
    `MSAVectorStore` comes back as the node it was stored from (ids, relationships, metadata), any other
    as a `TextNode`. `filters` restrict the documents before routing. `similarity_top_k` defaults to
    LlamaIndex's 2.
    """

    def __init__(self, engine: MSAEngine, similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K,
                 filters: Optional[MetadataFilters] = None, collection_name: str = DEFAULT_COLLECTION,
                 callback_manager: Optional[CallbackManager] = None, verbose: bool = False):
        self._engine = engine
        # AnswerOptions checks k once for every surface (k=0, k="3" and k=2.5 raise here, not at the first query)
        self._k = engine.answer_defaults.merged(k=similarity_top_k).k
        self._where = filters_to_predicate(filters)
        self._collection = check_collection(collection_name, allow_all=True)  # "*": every collection
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        documents = self._engine.retrieve(query_text(query_bundle), k=self._k, where=self._where,
                                           collection=self._collection)
        return to_nodes(documents)

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


def query_text(query: Any) -> str:
    """The question of a `QueryBundle` or str (the error every surface gives for a bad one)."""
    if isinstance(query, QueryBundle):
        query = query.query_str
    return check_text(query, "query")


def to_nodes(documents: List[RoutedDocument]) -> List[NodeWithScore]:
    """Routed documents -> `NodeWithScore`s in routing order, with the routing scores."""
    return [NodeWithScore(node=node_from_document(d), score=float(d.score)) for d in documents]
