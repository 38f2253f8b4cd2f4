"""`MSARetriever`: a LangChain `BaseRetriever` whose ranking is the model's router (no embeddings)."""

from __future__ import annotations

from typing import Any, List, Optional

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from msa_plugins import MSAEngine, RoutedDocument
from msa_plugins.validation import check_int, check_text

from .filters import filter_to_predicate


def to_document(doc: RoutedDocument) -> Document:
    """A routed memory document as a LangChain `Document` (same id, text and metadata; metadata copied)."""
    return Document(page_content=doc.text, metadata=dict(doc.metadata), id=doc.id)


def route_documents(engine: MSAEngine, query: str, k: int, flt: Any) -> List[tuple]:
    """[(Document, routing score)], best first, over the documents `flt` admits; [] on an empty memory or when
    the filter admits nothing. The shared search of `MSARetriever` and `MSAVectorStore`."""
    query = check_text(query, "query")
    k = check_int(k, "k", minimum=1)  # checked here too: the engine skips routing (and its checks) on an empty memory
    where = filter_to_predicate(flt)
    return [(to_document(d), float(d.score)) for d in engine.retrieve(query, k=k, where=where)]


class MSARetriever(BaseRetriever):
    """Routed documents in routing order; each carries `metadata["routing_score"]`.

    Setup:
        engine = MSAEngine.from_pretrained(); engine.add(texts, ids=ids, metadata=metas)
    Instantiate:
        retriever = MSARetriever(engine=engine, k=4, filter={"topic": "geo"})
    Use:
        retriever.invoke("question", k=2, filter={"year": {"$gte": 2001}})   # per-call k / filter
    """

    engine: Any = Field(exclude=True, description="the MSAEngine whose memory is searched")
    k: int = Field(default=4, description="documents returned per query")
    filter: Any = Field(default=None, description="metadata filter (dict, or a callable taking a Document)")
    model_config = ConfigDict(arbitrary_types_allowed=True)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: Optional[int] = None, filter: Any = None, **kwargs: Any) -> List[Document]:
        pairs = route_documents(self.engine, query, self.k if k is None else k,
                                self.filter if filter is None else filter)
        for doc, score in pairs:
            doc.metadata["routing_score"] = score
        return [doc for doc, _ in pairs]


__all__ = ["MSARetriever", "route_documents", "to_document"]
