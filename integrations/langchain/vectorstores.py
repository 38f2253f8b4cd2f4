"""`MSAVectorStore`: a LangChain `VectorStore` over one collection of an engine's memory; the model's router
ranks, no embeddings are computed or stored.

Scores. `similarity_search_with_score` returns the routing score: the layer-mean of the best cosine between a
question token's routing query and a document chunk's routing key (max over both), in [-1, 1]; relevant
documents typically score 0.15-0.4 with the shipped router, not the 0.5-0.9 of sentence embeddings.
`similarity_search_with_relevance_scores` (and `search_type="similarity_score_threshold"`) maps it to
LangChain's 0-1 relevance as Chroma does for a cosine collection: relevance = cosine, clipped at 0. The
meaning (higher = more relevant, 0 = unrelated) is LangChain's; the scale is the router's, so a threshold
tuned for embeddings must be re-tuned (see docs/integrations.md).

MMR. `max_marginal_relevance_search` / `search_type="mmr"` picks, from the `fetch_k` routed candidates, k
documents that are relevant (routing score, rescaled over the candidates to [0, 1]) and not redundant with
those already picked (cosine between document vectors). A document's vector is its pooled routing keys
(`engine.document_vectors`: the mean chunk key per routing layer, concatenated), so "redundant" means "the
router sees the two documents alike". There is no query vector: relevance is the routing score itself.
"""

from __future__ import annotations

import logging
import math
import uuid
import warnings
from typing import Any, Callable, Iterable, List, Optional, Sequence

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from msa_plugins import InvalidArgumentError, InvalidTypeError, MSAEngine
from msa_plugins.validation import check_int

from ._collections import DEFAULT_COLLECTION, check_collection, collection_kwargs, in_collection
from .filters import caller_metadata
from .._fields import refuse_unknown
from .retrievers import route_documents

logger = logging.getLogger(__name__)

_SEARCH_HINTS = {
    "score_threshold": "a score threshold needs search_type='similarity_score_threshold' "
                       "(or similarity_search_with_relevance_scores)",
    "fetch_k": "fetch_k and lambda_mult belong to search_type='mmr' (max_marginal_relevance_search)",
    "lambda_mult": "fetch_k and lambda_mult belong to search_type='mmr' (max_marginal_relevance_search)",
    "where": "use filter= (a dict or a callable on Document)",
    "where_document": "use filter= with a callable on Document, e.g. lambda d: 'x' in d.page_content",
}
_NO_VECTORS = ("MSAVectorStore has no embedding vectors: the model's router ranks documents from the query text. "
               "Use {use} instead")


def mmr_select(relevance: Sequence[float], vectors: np.ndarray, k: int, lambda_mult: float) -> List[int]:
    """Maximal marginal relevance: indices of k candidates, each maximising
    lambda * relevance - (1 - lambda) * (max cosine to the ones already chosen). `relevance` is rescaled over
    the candidates to [0, 1] so that lambda weighs two quantities on the same scale. vectors: [n, d], unit rows."""
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.ones_like(rel)
    sim = vectors @ vectors.T  # [n, n] cosines
    chosen = [int(np.argmax(rel))]
    while len(chosen) < min(k, len(rel)):
        redundancy = sim[:, chosen].max(axis=1)
        score = lambda_mult * rel - (1.0 - lambda_mult) * redundancy
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
    return chosen


class MSAVectorStore(VectorStore):
    """A VectorStore over one collection of the engine's memory: the router ranks, no embeddings are used.

    Setup:
        engine = MSAEngine.from_pretrained()
    Instantiate:
        store = MSAVectorStore(engine)                            # the engine's default collection
        store = MSAVectorStore(engine, collection_name="tenant-a")  # its own collection, like Chroma's
        store = MSAVectorStore.from_texts(texts, engine=engine, collection_name="docs")
    Add / delete:
        store.add_texts(texts, metadatas, ids=ids)   # an existing id of this collection is replaced (upsert)
        store.delete(["id1"])                        # ids that are not there are ignored
    Search:
        store.similarity_search("question", k=3, filter={"topic": "geo"})
        store.similarity_search_with_relevance_scores("question", k=3, score_threshold=0.2)
        store.max_marginal_relevance_search("question", k=3, fetch_k=10, lambda_mult=0.5)
        store.as_retriever(search_type="mmr" | "similarity_score_threshold", search_kwargs={...})
    Async:
        the VectorStore defaults run each call in an executor thread.
    """

    def __init__(self, engine: Optional[MSAEngine] = None, *, collection_name: str = DEFAULT_COLLECTION,
                 embedding: Optional[Embeddings] = None):
        if isinstance(engine, Embeddings) or engine is None:
            got = "no engine" if engine is None else f"an embedding model ({type(engine).__name__})"
            raise InvalidTypeError(f"MSAVectorStore needs the MSAEngine, got {got}: MSA ranks with the model's "
                                   "router, not with embeddings. Swap InMemoryVectorStore(embeddings) / "
                                   "Chroma(..., embedding_function=...) for MSAVectorStore(engine) or "
                                   "MSAVectorStore(engine, collection_name=...)")
        if not isinstance(engine, MSAEngine):
            raise InvalidTypeError(f"MSAVectorStore's first argument is the MSAEngine, got {type(engine).__name__}; "
                                   "a collection name goes in collection_name=")
        if embedding is not None:
            warnings.warn("MSAVectorStore ignores `embedding`: the model's router ranks documents", stacklevel=2)
        self.engine = engine
        self.collection_name = check_collection(collection_name)

    @property
    def embeddings(self) -> None:
        return None

    def _in(self) -> dict:
        return collection_kwargs(self.engine, self.collection_name)

    # ------------------------------------------------------------------ write
    def add_texts(self, texts: Iterable[str], metadatas: Optional[List[dict]] = None, *,
                  ids: Optional[List[str]] = None, **kwargs: Any) -> List[str]:
        refuse_unknown(kwargs, "MSAVectorStore.add_texts")
        texts = list(texts)
        ids = [uuid.uuid4().hex for _ in texts] if ids is None else \
            [i if i is not None else uuid.uuid4().hex for i in ids]
        # the engine replaces existing ids and adds the others in one swap: a reader never misses a document
        return self.engine.upsert(texts, ids=ids, metadata=metadatas, progress=False, **self._in())

    def add_documents(self, documents: List[Document], **kwargs: Any) -> List[str]:
        """As `InMemoryVectorStore`: `ids=None` (or no ids) keeps each Document's own `id` (LangChain's base
        class drops them when `ids=None` is passed explicitly); a Document without one gets a new id."""
        if kwargs.get("ids") is None:
            kwargs.pop("ids", None)
        return super().add_documents(documents, **kwargs)

    async def aadd_documents(self, documents: List[Document], **kwargs: Any) -> List[str]:
        if kwargs.get("ids") is None:
            kwargs.pop("ids", None)
        return await super().aadd_documents(documents, **kwargs)

    def delete(self, ids: Optional[List[str]] = None, **kwargs: Any) -> Optional[bool]:
        refuse_unknown(kwargs, "MSAVectorStore.delete")
        if ids is None:
            raise InvalidArgumentError("pass the ids to delete; MSAVectorStore does not delete everything at once")
        if isinstance(ids, str):
            ids = [ids]
        # a part id (`<id>#<p>`, never a caller's id) would delete a piece of a long text: no such document here;
        # missing ids are no error (the VectorStore contract)
        self.engine.delete([i for i in ids if "#" not in str(i)], missing_ok=True, **self._in())
        return True

    # ------------------------------------------------------------------ read
    def get_by_ids(self, ids: Sequence[str], /) -> List[Document]:
        snap = self.engine.snapshot()  # one view: a concurrent delete cannot split this answer
        out = []
        for i in ids:  # unknown ids (and ids of other collections) are skipped, as get_by_ids specifies
            if "#" in str(i) or i not in snap:  # a part id is no caller's id (ids cannot contain '#')
                continue
            parts = snap.get([i])  # a long text stored in parts comes back whole
            if not in_collection(parts[0], self.collection_name):
                continue
            out.append(Document(page_content="".join(p.text for p in parts), metadata=caller_metadata(parts[0]), id=i))
        return out

    def similarity_search_with_score(self, query: str, k: int = 4, filter: Any = None,
                                     **kwargs: Any) -> List[tuple]:
        """[(Document, routing score in [-1, 1])], best first."""
        refuse_unknown(kwargs, "MSAVectorStore search", _SEARCH_HINTS)
        return route_documents(self.engine, query, k, filter, self.collection_name)

    def similarity_search(self, query: str, k: int = 4, filter: Any = None, **kwargs: Any) -> List[Document]:
        return [d for d, _ in self.similarity_search_with_score(query, k=k, filter=filter, **kwargs)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        if self.engine.config.score != "cosine":
            raise InvalidArgumentError(f"relevance scores need cosine routing scores; this engine routes with "
                                       f"score={self.engine.config.score!r} (unbounded). Use "
                                       "similarity_search_with_score, or an engine built with score='cosine'")
        return lambda s: min(1.0, max(0.0, s))  # relevance = routing cosine, clipped at 0 (Chroma's cosine meaning)

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
                                      filter: Any = None, **kwargs: Any) -> List[Document]:
        refuse_unknown(kwargs, "MSAVectorStore.max_marginal_relevance_search", _SEARCH_HINTS)
        k = check_int(k, "k", minimum=1)
        fetch_k = check_int(fetch_k, "fetch_k", minimum=1)
        k = min(k, fetch_k)  # as InMemoryVectorStore: k picks among the fetch_k candidates, so at most fetch_k
        if isinstance(lambda_mult, bool) or not isinstance(lambda_mult, (int, float)) \
                or math.isnan(lambda_mult) or not 0.0 <= lambda_mult <= 1.0:
            raise InvalidArgumentError(f"lambda_mult must be a number in [0, 1] (1: relevance only, 0: diversity "
                                       f"only), got {lambda_mult!r}")
        snap = self.engine.snapshot()  # one view: a concurrent delete cannot drop a candidate's vector
        pairs = route_documents(self.engine, query, fetch_k, filter, self.collection_name, snapshot=snap)
        if not pairs:
            return []
        docs = [d for d, _ in pairs]
        vectors = self.engine.document_vectors([d.id for d in docs], snapshot=snap).numpy()  # [fetch_k, L*G*D]
        picked = mmr_select([s for _, s in pairs], vectors, k, float(lambda_mult))
        return [docs[i] for i in picked]

    def similarity_search_by_vector(self, embedding: List[float], k: int = 4, **kwargs: Any) -> List[Document]:
        raise NotImplementedError(_NO_VECTORS.format(use="similarity_search(query)"))

    def max_marginal_relevance_search_by_vector(self, embedding: List[float], k: int = 4, fetch_k: int = 20,
                                                lambda_mult: float = 0.5, **kwargs: Any) -> List[Document]:
        raise NotImplementedError(_NO_VECTORS.format(use="max_marginal_relevance_search(query)"))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_texts(cls, texts: List[str], embedding: Optional[Embeddings] = None,
                   metadatas: Optional[List[dict]] = None, *, ids: Optional[List[str]] = None,
                   engine: Optional[MSAEngine] = None, collection_name: str = DEFAULT_COLLECTION,
                   **kwargs: Any) -> "MSAVectorStore":
        refuse_unknown(kwargs, "MSAVectorStore.from_texts")
        if engine is None:
            raise InvalidArgumentError("MSAVectorStore.from_texts needs engine=MSAEngine.from_pretrained(...)")
        store = cls(engine, collection_name=collection_name, embedding=embedding)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    @classmethod
    def from_documents(cls, documents: List[Document], embedding: Optional[Embeddings] = None,
                       **kwargs: Any) -> "MSAVectorStore":
        ids = kwargs.pop("ids", None) or ([d.id for d in documents] if any(d.id for d in documents) else None)
        return cls.from_texts([d.page_content for d in documents], embedding,
                              [d.metadata for d in documents], ids=ids, **kwargs)


__all__ = ["MSAVectorStore", "mmr_select"]
