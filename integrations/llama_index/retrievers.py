"""`MSARetriever`: LlamaIndex's `BaseRetriever` over an engine's memory; the model's router ranks (no
embeddings). Also the one place routed documents become `NodeWithScore`s (the query engine's sources
use it too)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle, TextNode
from llama_index.core.vector_stores.types import MetadataFilters

from msa_plugins import MSAEngine, RoutedDocument
from msa_plugins.validation import check_text

from .filters import filters_to_predicate

if TYPE_CHECKING:
    from .indices import MSAIndex

__all__ = ["MSARetriever"]


class MSARetriever(BaseRetriever):
    """Routes a query to memory documents with the model's router.

    Nodes come back best first with their routing scores (layer-mean cosine by default). With an
    `index`, each node is the original node from its docstore (ids, relationships, metadata), else a
    `TextNode` built from the memory document. `filters` restrict the documents before routing.
    """

    def __init__(self, engine: MSAEngine, index: Optional["MSAIndex"] = None, similarity_top_k: Optional[int] = None,
                 filters: Optional[MetadataFilters] = None, callback_manager: Optional[CallbackManager] = None,
                 verbose: bool = False, **kwargs: Any):
        self._engine = engine
        self._index = index
        # AnswerOptions checks k once for every surface (k=0, k="3" and k=2.5 raise here, not at the first query)
        self._k = engine.answer_defaults.merged(k=similarity_top_k).k
        self._where = filters_to_predicate(filters)
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        documents = self._engine.retrieve(query_text(query_bundle), k=self._k, where=self._where)
        return to_nodes(self._index, documents)

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


def query_text(query) -> str:
    """The question of a `QueryBundle` or str (the error every surface gives for a bad one)."""
    if isinstance(query, QueryBundle):
        query = query.query_str
    return check_text(query, "query")


def to_nodes(index: Optional["MSAIndex"], documents: List[RoutedDocument]) -> List[NodeWithScore]:
    """Routed documents -> `NodeWithScore`s in routing order, with the routing scores."""
    return [NodeWithScore(node=_node_for(index, d), score=float(d.score)) for d in documents]


def _node_for(index: Optional["MSAIndex"], doc: RoutedDocument) -> BaseNode:
    """The original node (from the index's docstore) of a routed document, else a TextNode of it."""
    if index is not None:
        node = index.docstore.get_node(doc.id, raise_error=False)
        if node is not None:
            return node
    metadata = {k: v for k, v in doc.metadata.items() if k != "ref_doc_id"}  # ref_doc_id is ours, not the user's
    return TextNode(id_=doc.id, text=doc.text, metadata=metadata)
