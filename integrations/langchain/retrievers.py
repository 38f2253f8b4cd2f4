"""`MSARetriever`: a LangChain `BaseRetriever` whose ranking is the model's router (no embeddings)."""

from __future__ import annotations

from typing import Any, List, Optional

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field, field_validator, model_validator

from msa_plugins import AnswerOptions, InvalidArgumentError, MSAEngine, RoutedDocument, Snapshot
from msa_plugins.validation import check_int, check_text

from .._fields import check_engine, refuse_unknown, unknown_fields
from ._collections import DEFAULT_COLLECTION, check_collection, collection_kwargs
from .filters import caller_metadata, filter_to_predicate


def to_document(doc: RoutedDocument, snapshot: Optional[Snapshot] = None) -> Document:
    """A routed memory document as a LangChain `Document` (same id, text and metadata; metadata copied). A part
    of a text longer than the window comes back as the whole text, under the caller's id (from `snapshot`)."""
    if doc.whole_id == doc.id or snapshot is None:
        return Document(page_content=doc.text, metadata=dict(doc.metadata), id=doc.id)
    parts = snapshot.get([doc.whole_id])
    return Document(page_content="".join(p.text for p in parts), metadata=caller_metadata(doc), id=doc.whole_id)


def route_documents(engine: MSAEngine, query: str, k: int, flt: Any,
                    collection: str = DEFAULT_COLLECTION, snapshot: Optional[Snapshot] = None,
                    rounds: int = 1, k_per_round: bool = False, rerank: int = 0) -> List[tuple]:
    """[(Document, routing score)], best first, over the documents of `collection` that `flt` admits; [] on an
    empty collection or when the filter admits nothing. The shared search of `MSARetriever` and `MSAVectorStore`.
    `snapshot`: route over this view of the memory (None: the memory now). `rounds` > 1: multi-hop routing
    (`MSAEngine.retrieve(..., rounds=, k_per_round=)`), each document's round in `metadata["routing_round"]`.
    `rerank` = N: the top N reordered by the model's own question likelihood (`MSAEngine.retrieve(..., rerank=)`)."""
    query = check_text(query, "query")
    k = check_int(k, "k", minimum=1)  # checked here too: the engine skips routing (and its checks) on an empty memory
    where = filter_to_predicate(flt)
    snapshot = snapshot if snapshot is not None else engine.snapshot()  # one view: routing and the texts
    # k distinct texts, a long one (stored in parts) once, whole, at its best part's score: as a vector store
    # holding one vector per document ranks them
    docs = engine.retrieve(query, k=k, where=where, snapshot=snapshot, rounds=rounds, k_per_round=k_per_round,
                           whole_texts=True, rerank=rerank, **collection_kwargs(engine, collection))
    pairs = [(to_document(d, snapshot), float(d.score)) for d in docs]
    if rounds > 1:
        for (doc, _), d in zip(pairs, docs):
            doc.metadata["routing_round"] = d.round
    return pairs


# what other retrievers' constructors take, and MSARetriever's way to say it (any other unknown one is refused too)
_INIT_HINTS = {
    "collection_name": "MSARetriever's collection is `collection=`",
    "search_kwargs": "pass k= and filter= to MSARetriever itself (search_kwargs belongs to VectorStore.as_retriever)",
    "search_type": "MSARetriever returns the routing order; for MMR or a score threshold use "
                   "MSAVectorStore(engine).as_retriever(search_type=...)",
    **dict.fromkeys(("top_k", "similarity_top_k"), "MSARetriever's number of documents is `k=`")}


_UNSET = object()  # no per-call filter given (None is one: "no filter")


class MSARetriever(BaseRetriever):
    """Routed documents in routing order; each carries `metadata["routing_score"]`.

    Setup:
        engine = MSAEngine.from_pretrained(); engine.add(texts, ids=ids, metadata=metas)
    Instantiate:
        retriever = MSARetriever(engine=engine, k=4, filter={"topic": "geo"}, collection="default")
    Use:
        retriever.invoke("question", k=2, filter={"year": {"$gte": 2001}})   # per-call k / filter
    Multi-hop: `rounds=2` returns k documents in all, split over 2 routing rounds (the second routes the
    question with the text the first found), each with `metadata["routing_round"]`; `k_per_round=True`: k per
    round. `rerank=20`: the router's top 20 (at least k; with rounds, each round's) reordered by how likely the
    engine's own model finds the query given each; `routing_score` is then the fused score.
    """

    engine: Any = Field(exclude=True, description="the MSAEngine whose memory is searched")
    k: int = Field(default=4, description="documents returned per query (per round with k_per_round=True)")
    filter: Any = Field(default=None, description="metadata filter (dict, or a callable taking a Document)")
    collection: str = Field(default=DEFAULT_COLLECTION, description="the collection searched ('*': all of them)")
    rounds: int = Field(default=1, description="routing rounds (multi-hop): later ones route with the text found")
    k_per_round: bool = Field(default=False, description="with rounds > 1: k documents per round, not k in all")
    rerank: int = Field(default=0, description="reorder the router's top N by the model's question likelihood (0: off)")
    model_config = ConfigDict(arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_fields(cls, data):
        refuse_unknown(unknown_fields(cls, data), "MSARetriever()", _INIT_HINTS)
        return data

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, v):
        return check_engine(v, "MSARetriever")

    @field_validator("rounds", "k_per_round", "rerank", mode="before")
    @classmethod
    def _check_round_option(cls, v, info):
        # before pydantic's lax coercion ("2" -> 2, 1 -> True): the error every surface gives
        return getattr(AnswerOptions(**{info.field_name: v}), info.field_name)

    @model_validator(mode="after")
    def _check_max_rounds(self):
        self.engine.check_rounds(self.rounds)  # at construction, not at the first query
        return self

    @field_validator("collection")
    @classmethod
    def _check_collection(cls, v):
        return check_collection(v, allow_all=True)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: Optional[int] = None, filter: Any = _UNSET, **kwargs: Any) -> List[Document]:
        refuse_unknown(kwargs, "MSARetriever.invoke", dict.fromkeys(
            ("rounds", "k_per_round", "rerank"),
            "rounds, k_per_round and rerank are set on the retriever: MSARetriever(..., rounds=2)"))
        pairs = route_documents(self.engine, query, self.k if k is None else k,
                                # a per-call filter, None included, replaces the retriever's (VectorStoreRetriever)
                                self.filter if filter is _UNSET else filter, self.collection, rounds=self.rounds,
                                k_per_round=self.k_per_round, rerank=self.rerank)
        for doc, score in pairs:
            doc.metadata["routing_score"] = score
        return [doc for doc, _ in pairs]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       **kwargs: Any) -> List[Document]:
        # BaseRetriever's default drops per-call arguments (ainvoke(q, k=2) raised TypeError): pass them on
        return await run_in_executor(None, self._get_relevant_documents, query, run_manager=run_manager.get_sync(),
                                     **kwargs)


__all__ = ["MSARetriever", "route_documents", "to_document"]
