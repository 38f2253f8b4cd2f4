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

from msa_plugins import AnswerOptions, InvalidArgumentError, MSAEngine, RoutedDocument
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
    LlamaIndex's 2. `rounds` > 1 routes multi-hop (`MSAEngine.retrieve(..., rounds=)`): `similarity_top_k`
    nodes in all, split over the rounds (each later round routes the question with the text found so far),
    or with `k_per_round=True` that many per round; a node's `metadata` is the document's own, and its round
    is not added to it. `rerank=N`: the router's top N (at least `similarity_top_k`; with rounds, each round's)
    reordered by how likely the engine's own model finds the query given each (`MSAEngine.retrieve(..., rerank=)`);
    scores are then the fused scores.
    """

    def __init__(self, engine: MSAEngine, similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K,
                 filters: Optional[MetadataFilters] = None, collection_name: str = DEFAULT_COLLECTION,
                 callback_manager: Optional[CallbackManager] = None, verbose: bool = False, rounds: int = 1,
                 k_per_round: bool = False, rerank: int = 0):
        self._engine = engine
        # AnswerOptions checks k, rounds and k_per_round once for every surface (k=0, k="3" and k=2.5 raise here,
        # not at the first query)
        checked = AnswerOptions(k=engine.answer_defaults.merged(k=similarity_top_k).k, rounds=rounds,
                                k_per_round=k_per_round, rerank=rerank)
        engine.check_rounds(checked.rounds)
        self._k, self._rounds, self._k_per_round = checked.k, checked.rounds, checked.k_per_round
        self._rerank = checked.rerank
        self._where = filters_to_predicate(filters)
        self._collection = check_collection(collection_name, allow_all=True)  # "*": every collection
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        # a node longer than the window is stored in parts, each carrying the whole node: each node once
        documents = self._engine.retrieve(query_text(query_bundle), k=self._k, where=self._where,
                                           collection=self._collection, rounds=self._rounds,
                                           k_per_round=self._k_per_round, whole_texts=True, rerank=self._rerank)
        return to_nodes(documents)

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


def query_text(query: Any) -> str:
    """The question of a `QueryBundle` or str (the error every surface gives for a bad one). A bundle whose
    `custom_embedding_strs` say to embed other text (HyDEQueryTransform's hypothetical document) is refused:
    the router reads the question, and dropping those strings silently would change what the app asked for."""
    if isinstance(query, QueryBundle):
        # (a set `embedding` is no such request: a vector retriever beside this one, e.g. in QueryFusionRetriever,
        # stores its embedding of query_str on the shared bundle)
        custom = [t for t in (query.custom_embedding_strs or []) if t != query.query_str]
        if custom:
            raise InvalidArgumentError(
                "this QueryBundle asks for other text to be searched with (custom_embedding_strs, e.g. from "
                "HyDEQueryTransform); MSA routes the question itself and embeds nothing: drop the query transform, "
                "or put the text to route on in query_str")
        query = query.query_str
    return check_text(query, "query")


def to_nodes(documents: List[RoutedDocument]) -> List[NodeWithScore]:
    """Routed documents -> `NodeWithScore`s in routing order, with the routing scores."""
    return [NodeWithScore(node=node_from_document(d), score=float(d.score)) for d in documents]
