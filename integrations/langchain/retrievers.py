"""`MSARetriever`: a LangChain `BaseRetriever` whose ranking is the model's router (no embeddings)."""

from __future__ import annotations

from typing import Any, List, Optional

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, field_validator

from msa_plugins import InvalidArgumentError, MSAEngine, RoutedDocument, Snapshot
from msa_plugins.validation import check_int, check_text

from ._collections import DEFAULT_COLLECTION, check_collection, collection_kwargs
from .filters import filter_to_predicate


def to_document(doc: RoutedDocument) -> Document:
    """A routed memory document as a LangChain `Document` (same id, text and metadata; metadata copied)."""
    return Document(page_content=doc.text, metadata=dict(doc.metadata), id=doc.id)


def refuse_unknown(kwargs: dict, where: str, hints: Optional[dict] = None) -> None:
    """No silent knobs: an argument this surface does not read is an error naming it (and what to use)."""
    if not kwargs:
        return
    hints = hints or {}
    notes = "; ".join(hints[k] for k in kwargs if k in hints)
    raise InvalidArgumentError(f"{where} got unknown argument(s) {sorted(kwargs)}" + (f": {notes}" if notes else "")
                               + "; see docs/integrations.md for the supported ones")


def route_documents(engine: MSAEngine, query: str, k: int, flt: Any,
                    collection: str = DEFAULT_COLLECTION, snapshot: Optional[Snapshot] = None) -> List[tuple]:
    """[(Document, routing score)], best first, over the documents of `collection` that `flt` admits; [] on an
    empty collection or when the filter admits nothing. The shared search of `MSARetriever` and `MSAVectorStore`.
    `snapshot`: route over this view of the memory (None: the memory now)."""
    query = check_text(query, "query")
    k = check_int(k, "k", minimum=1)  # checked here too: the engine skips routing (and its checks) on an empty memory
    where = filter_to_predicate(flt)
    docs = engine.retrieve(query, k=k, where=where, snapshot=snapshot, **collection_kwargs(engine, collection))
    return [(to_document(d), float(d.score)) for d in docs]


class MSARetriever(BaseRetriever):
    """Routed documents in routing order; each carries `metadata["routing_score"]`.

    Setup:
        engine = MSAEngine.from_pretrained(); engine.add(texts, ids=ids, metadata=metas)
    Instantiate:
        retriever = MSARetriever(engine=engine, k=4, filter={"topic": "geo"}, collection="default")
    Use:
        retriever.invoke("question", k=2, filter={"year": {"$gte": 2001}})   # per-call k / filter
    """

    engine: Any = Field(exclude=True, description="the MSAEngine whose memory is searched")
    k: int = Field(default=4, description="documents returned per query")
    filter: Any = Field(default=None, description="metadata filter (dict, or a callable taking a Document)")
    collection: str = Field(default=DEFAULT_COLLECTION, description="the collection searched ('*': all of them)")
    model_config = ConfigDict(arbitrary_types_allowed=True)

    @field_validator("collection")
    @classmethod
    def _check_collection(cls, v):
        return check_collection(v, allow_all=True)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: Optional[int] = None, filter: Any = None, **kwargs: Any) -> List[Document]:
        refuse_unknown(kwargs, "MSARetriever.invoke")
        pairs = route_documents(self.engine, query, self.k if k is None else k,
                                self.filter if filter is None else filter, self.collection)
        for doc, score in pairs:
            doc.metadata["routing_score"] = score
        return [doc for doc, _ in pairs]


__all__ = ["MSARetriever", "route_documents", "to_document", "refuse_unknown"]
