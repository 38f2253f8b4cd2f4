"""`MSAQueryEngine`: retriever-free answering. The engine routes and answers in one call (`engine.stream`);
the routed documents become `Response.source_nodes`."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager
from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import MetadataFilters

from msa_plugins import MSAEngine, QueryResult

from .._aio import aiter_in_thread
from ._collections import DEFAULT_COLLECTION, check_collection
from .filters import filters_to_predicate
from .retrievers import MSARetriever, query_text, to_nodes

EMPTY_RESPONSE = "Empty Response"  # what LlamaIndex's synthesizers answer when nothing was retrieved
NOTHING_TO_ANSWER_FROM = "no memory document to answer from (the memory is empty or no document matches the filters)"

__all__ = ["MSAQueryEngine"]


class MSAQueryEngine(BaseQueryEngine):
    """Retriever-free answering: the engine routes and answers in one call.

    `Response.source_nodes` are the routed documents in routing order with their routing scores;
    `Response.metadata` holds `timings`, `usage` (prompt/completion/total tokens), `mode`,
    `finish_reason` and `routed` (id, score, round, rank per document). When no document matches the
    filters (or the memory is empty) the answer is LlamaIndex's "Empty Response", as its own query engines
    give, and nothing is generated.

    Only MSA's own knobs are accepted (unknown ones raise): `similarity_top_k` (LlamaIndex's default, 2),
    `filters`, `streaming`, `mode`, `max_new_tokens`, `temperature`, `rounds`, `k_per_round`, `rerank`,
    `system_prompt`, `seed`, `collection_name`. Response synthesis, postprocessors and prompt templates belong to LlamaIndex's
    `RetrieverQueryEngine` (`MSAIndex.as_query_engine()` without `mode=`).
    """

    def __init__(self, engine: MSAEngine, streaming: bool = False, filters: Optional[MetadataFilters] = None,
                 similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K, mode: Optional[str] = None,
                 max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 rounds: Optional[int] = None, system_prompt: Optional[str] = None, seed: Optional[int] = None,
                 collection_name: str = DEFAULT_COLLECTION, callback_manager: Optional[CallbackManager] = None,
                 k_per_round: Optional[bool] = None, rerank: Optional[int] = None):
        self._engine, self._streaming = engine, streaming
        self._collection = check_collection(collection_name, allow_all=True)  # "*": every collection
        self._where = filters_to_predicate(filters)  # checked now, not at the first query
        # LlamaIndex's names -> the engine's per-call options, checked now (not at the first query)
        self._options = engine.answer_defaults.merged(
            mode=mode, k=similarity_top_k, max_new_tokens=max_new_tokens, temperature=temperature, rounds=rounds,
            system=system_prompt, seed=seed, k_per_round=k_per_round, rerank=rerank)
        # retrieve(): the documents query() answers from, rounds included
        self._retriever = MSARetriever(engine, similarity_top_k=self._options.k, filters=filters,
                                       collection_name=collection_name, callback_manager=callback_manager,
                                       rounds=self._options.rounds, k_per_round=self._options.k_per_round,
                                       rerank=self._options.rerank)
        super().__init__(callback_manager=callback_manager)

    def _get_prompt_modules(self) -> Dict[str, Any]:
        return {}

    def retrieve(self, query_bundle) -> List[NodeWithScore]:
        """The routed documents alone (what `query` would answer from, every round), without generating. In
        protocol mode the documents the model asks for while it writes are not known before it writes."""
        if not isinstance(query_bundle, QueryBundle):
            query_bundle = QueryBundle(query_text(query_bundle))
        return self._retriever.retrieve(query_bundle)

    def _query(self, query_bundle: QueryBundle):
        stream = self._engine.stream(query_text(query_bundle), self._options, where=self._where,
                                     collection=self._collection)
        sources = to_nodes(stream.documents)
        if not stream.documents:
            stream.close()  # nothing to answer from: generate nothing, as LlamaIndex's synthesizers do
            metadata = {**_result_metadata(stream.result), "note": NOTHING_TO_ANSWER_FROM}
            if self._streaming:
                return StreamingResponse(response_gen=iter([EMPTY_RESPONSE]), source_nodes=[], metadata=metadata)
            return Response(EMPTY_RESPONSE, source_nodes=[], metadata=metadata)
        if self._streaming:
            filled_at_end: dict = {}  # the result's metadata, once the last piece has been read (or on close)

            def pieces():
                try:
                    yield from stream
                finally:
                    stream.close()
                    filled_at_end.update(_result_metadata(stream.result))

            return StreamingResponse(response_gen=pieces(), source_nodes=sources, metadata=filled_at_end)
        result = stream.collect()
        return Response(result.answer, source_nodes=sources, metadata=_result_metadata(result))

    async def _aquery(self, query_bundle: QueryBundle):
        response = await asyncio.to_thread(self._query, query_bundle)
        if not self._streaming:
            return response
        return AsyncStreamingResponse(response_gen=aiter_in_thread(lambda: response.response_gen),
                                      source_nodes=response.source_nodes, metadata=response.metadata)


def _result_metadata(result: QueryResult) -> dict:
    return {"timings": dict(result.timings), "usage": result.usage, "mode": result.mode,
            "finish_reason": result.finish_reason,
            "routed": [{"id": d.id, "score": d.score, "round": d.round, "rank": d.rank} for d in result.documents]}
