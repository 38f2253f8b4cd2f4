"""`MSAVectorStore`: a LangChain `VectorStore` stand-in over an engine's memory; the model's router ranks,
no embeddings are computed or stored."""

from __future__ import annotations

import uuid
import warnings
from typing import Any, Callable, Iterable, List, Optional, Sequence

from langchain_core.documents import Document
from langchain_core.vectorstores import VectorStore

from msa_plugins import InvalidArgumentError

from .retrievers import route_documents

# a split long document's parts carry these on top of the caller's metadata
_PART_KEYS = ("parent_id", "part")


class MSAVectorStore(VectorStore):
    """A VectorStore over the engine's memory: the model's router ranks documents, no embeddings are used.

    Setup:
        engine = MSAEngine.from_pretrained()
    Instantiate:
        store = MSAVectorStore(engine)            # or MSAVectorStore.from_texts(texts, engine=engine)
    Add / delete:
        store.add_texts(texts, metadatas, ids=ids)   # an existing id is replaced (upsert)
        store.delete(["id1"])                        # ids that are not there are ignored
    Search:
        store.similarity_search("question", k=3, filter={"topic": "geo"})
        store.as_retriever(search_kwargs={"k": 3})
    Async:
        the VectorStore defaults run each call in an executor thread.
    """

    def __init__(self, engine, embedding=None, k: int = 4):
        self.engine = engine
        self.k = k
        if embedding is not None:
            warnings.warn("MSAVectorStore ignores `embedding`: the model's router ranks documents", stacklevel=2)

    @property
    def embeddings(self):
        return None

    def add_texts(self, texts: Iterable[str], metadatas: Optional[List[dict]] = None, *,
                  ids: Optional[List[str]] = None, **kwargs: Any) -> List[str]:
        texts = list(texts)
        ids = [uuid.uuid4().hex for _ in texts] if ids is None else \
            [i if i is not None else uuid.uuid4().hex for i in ids]
        # the engine replaces existing ids and adds the others in one swap: a reader never misses a document
        return self.engine.upsert(texts, ids=ids, metadata=metadatas, progress=False)

    def delete(self, ids: Optional[List[str]] = None, **kwargs: Any) -> Optional[bool]:
        if ids is None:
            raise InvalidArgumentError("pass the ids to delete; MSAVectorStore does not delete everything at once")
        if isinstance(ids, str):
            ids = [ids]
        self.engine.delete(ids, missing_ok=True)  # the VectorStore contract: missing ids are not an error
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> List[Document]:
        snap = self.engine.snapshot()  # one view: a concurrent delete cannot split this answer
        out = []
        for i in ids:  # unknown ids are skipped, as VectorStore.get_by_ids specifies
            if i not in snap:
                continue
            parts = snap.get([i])  # a long text stored in parts comes back whole
            meta = parts[0].metadata
            if len(parts) > 1:
                meta = {k: v for k, v in meta.items() if k not in _PART_KEYS}
            out.append(Document(page_content="".join(p.text for p in parts), metadata=dict(meta), id=i))
        return out

    def similarity_search_with_score(self, query: str, k: int = 4, filter: Any = None,
                                     **kwargs: Any) -> List[tuple]:
        return route_documents(self.engine, query, k, filter)

    def similarity_search(self, query: str, k: int = 4, filter: Any = None, **kwargs: Any) -> List[Document]:
        return [d for d, _ in self.similarity_search_with_score(query, k=k, filter=filter)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda s: (s + 1.0) / 2.0  # cosine routing scores in [-1, 1] -> [0, 1]

    @classmethod
    def from_texts(cls, texts: List[str], embedding=None, metadatas: Optional[List[dict]] = None, *,
                   ids: Optional[List[str]] = None, engine=None, **kwargs: Any) -> "MSAVectorStore":
        if engine is None:
            raise InvalidArgumentError("MSAVectorStore.from_texts needs engine=MSAEngine.from_pretrained(...)")
        store = cls(engine, embedding=embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    @classmethod
    def from_documents(cls, documents: List[Document], embedding=None, **kwargs: Any) -> "MSAVectorStore":
        ids = kwargs.pop("ids", None) or ([d.id for d in documents] if any(d.id for d in documents) else None)
        return cls.from_texts([d.page_content for d in documents], embedding,
                              [d.metadata for d in documents], ids=ids, **kwargs)


__all__ = ["MSAVectorStore"]
