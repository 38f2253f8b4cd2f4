"""`MSAVectorStore`: LlamaIndex's vector-store extension point over an engine's memory.

    vector_store = MSAVectorStore(engine)                      # collection_name="default"
    storage_context = StorageContext.from_defaults(vector_store=vector_store)
    index = VectorStoreIndex.from_documents(docs, storage_context=storage_context, embed_model=NoEmbedding())
    index.as_query_engine(llm=MSALLM(engine)).query("...")

The store keeps text (`stores_text=True`) and routes on the query string (`is_embedding_query=False`), so
the plain `VectorStoreIndex`, `IngestionPipeline(vector_store=...)`, `from_vector_store`, retrievers,
response synthesizers, postprocessors and LlamaIndex's instrumentation all run unchanged; the model's router
ranks the nodes instead of a vector similarity. Each node is one memory document under its node id, in the
store's collection; its full LlamaIndex form (relationships, metadata, text) rides in the document's
metadata, as vector databases store it (`node_to_metadata_dict`).

Embeddings: `VectorStoreIndex` and `IngestionPipeline` compute one embedding per node before handing it to
any vector store, so they need an embedding model. This store never reads the vectors. `NoEmbedding` fills
that slot with empty vectors and costs nothing (a no-op by design); vectors from any other model are
ignored, and the store says so once in the log.

MMR (`vector_store_query_mode="mmr"`): the `similarity_top_k * mmr_prefetch_factor` (default 4) best routed
nodes (or `mmr_prefetch_k` of them) are re-ranked with LlamaIndex's own `get_top_k_mmr_embeddings`:
relevance is each candidate's routing score, rescaled over the candidates to [0, 1]; redundancy is the cosine
between the documents' pooled routing keys (`engine.document_vectors`). `mmr_threshold` (in
`vector_store_kwargs`, default 0.5) weighs them as LlamaIndex does: 1 keeps routing order, 0 is diversity
only. The nodes keep their routing scores as similarities, as Chroma keeps its distances.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.indices.query.embedding_utils import get_top_k_mmr_embeddings
from llama_index.core.schema import BaseNode, MetadataMode, TextNode
from llama_index.core.vector_stores.types import (BasePydanticVectorStore, MetadataFilters, VectorStoreQuery,
                                                  VectorStoreQueryMode, VectorStoreQueryResult)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict
from pydantic import Field, PrivateAttr

from msa_plugins import InvalidArgumentError, InvalidTypeError, MemoryDocument, MemoryFormatError, MSAEngine

from msa_plugins.validation import check_int, check_text

from .._fields import refuse_unknown, unknown_fields
from ._collections import DEFAULT_COLLECTION, check_collection
from .filters import filters_to_predicate

logger = logging.getLogger(__name__)

MEMORY_DIR = "msa_memory"  # the engine's memory, inside a LlamaIndex persist_dir
MARKER_KEY = "msa_memory"  # in <persist_dir>/default__vector_store.json: where the memory is, which collection
LOAD_HINT = ("this folder holds an MSA memory, not a SimpleVectorStore: load it with "
             "msa_plugins.integrations.llama_index.load_msa_index(persist_dir, engine), or pass "
             "vector_store=MSAVectorStore.from_persist_dir(persist_dir, engine) to StorageContext.from_defaults")
MMR_KWARGS = ("mmr_threshold", "mmr_prefetch_factor", "mmr_prefetch_k")  # Chroma's names for the same knobs
DEFAULT_MMR_PREFETCH_FACTOR = 4.0  # as llama-index-vector-stores-chroma / -postgres

__all__ = ["MSAVectorStore", "NoEmbedding", "node_from_document", "MEMORY_DIR"]


class NoEmbedding(BaseEmbedding):
    """The embedding model for an index over `MSAVectorStore`: a no-op by design.

    LlamaIndex embeds every node before it reaches a vector store; MSA routes on the text, so the vector
    is never read. Each text gets an empty vector, at no cost. Use it wherever LlamaIndex asks for an
    `embed_model` in front of an `MSAVectorStore` (`VectorStoreIndex(..., embed_model=NoEmbedding())`,
    `IngestionPipeline(transformations=[..., NoEmbedding()])`).
    """

    model_name: str = "msa-routing (no embedding)"
    embed_batch_size: int = 2048

    @classmethod
    def class_name(cls) -> str:
        return "NoEmbedding"

    def _get_query_embedding(self, query: str) -> Embedding:
        return []

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return []

    def _get_text_embedding(self, text: str) -> Embedding:
        return []

    def _get_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return [[] for _ in texts]


class MSAVectorStore(BasePydanticVectorStore):
    """LlamaIndex vector store over an `MSAEngine`'s memory: the model's router ranks, no embeddings.

    Args:
        engine: the `MSAEngine` that holds the memory (positional, as a vector DB client is).
        collection_name: this store's collection; stores with different names on one engine never see
            each other's nodes (Chroma's shape). "default" is the engine's own collection.

    Scores are the router's layer-mean cosine (about 0.1-0.4 on the shipped router), not an embedding
    cosine: a `SimilarityPostprocessor(similarity_cutoff=...)` tuned for embeddings needs re-tuning.
    Supported query knobs: `similarity_top_k`, `filters`, `node_ids`, `doc_ids`, and
    `vector_store_query_mode="mmr"` with `mmr_threshold` / `mmr_prefetch_factor` / `mmr_prefetch_k` in
    `vector_store_kwargs` (see the module doc). Anything else (sparse, hybrid or learner modes, `alpha`,
    MMR knobs without the MMR mode, unknown kwargs) raises.
    """

    stores_text: bool = True
    is_embedding_query: bool = False  # LlamaIndex passes the query string, never embeds the query
    flat_metadata: bool = False
    collection_name: str = Field(default=DEFAULT_COLLECTION, description="the engine collection this store uses")
    _engine: Any = PrivateAttr()
    _warned_embeddings: bool = PrivateAttr(default=False)

    def __init__(self, engine: Optional[MSAEngine] = None, collection_name: str = DEFAULT_COLLECTION, **kwargs: Any):
        if not isinstance(engine, MSAEngine):
            got = "nothing" if engine is None else type(engine).__name__
            raise InvalidTypeError(f"MSAVectorStore needs an MSAEngine (MSAVectorStore(engine)), got {got}: MSA "
                                   "routes with the model's own attention, so it takes no embedding model or "
                                   "vector DB client")
        refuse_unknown(unknown_fields(type(self), kwargs), "MSAVectorStore()", {
            "collection": "MSAVectorStore's collection is `collection_name=`",
            "persist_dir": "load a persisted store with MSAVectorStore.from_persist_dir(persist_dir, engine)",
            "persist_path": "load a persisted store with MSAVectorStore.from_persist_dir(persist_dir, engine)"})
        super().__init__(collection_name=check_collection(collection_name), **kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "MSAVectorStore"

    @property
    def client(self) -> MSAEngine:
        return self._engine

    @property
    def engine(self) -> MSAEngine:
        return self._engine

    # ------------------------------------------------------------------ helpers
    def _coll(self) -> dict:
        return {"collection": self.collection_name}

    def _select(self, where=None) -> List[str]:
        """Ids of this collection's documents that `where` admits, in storage order."""
        return self._engine.snapshot().select(where, collection=self.collection_name)

    @staticmethod
    def _where(node_ids=None, doc_ids=None, filters: Optional[MetadataFilters] = None):
        """One predicate for node ids, ref-doc ids and metadata filters (None when nothing restricts)."""
        match = filters_to_predicate(filters)
        # an empty list restricts nothing: LlamaIndex's own retriever (VectorStoreIndex.as_retriever) passes
        # node_ids=[] for every store that keeps its text (its index_struct lists no node); callers that mean
        # "these ids and no others" get [] from get_nodes/delete_nodes, which treat [] as no node
        node_ids = set(node_ids) if node_ids else None
        doc_ids = set(doc_ids) if doc_ids else None
        if match is None and node_ids is None and doc_ids is None:
            return None

        def where(doc: MemoryDocument) -> bool:
            return ((node_ids is None or doc.whole_id in node_ids)
                    and (doc_ids is None or doc.metadata.get("ref_doc_id") in doc_ids)
                    and (match is None or match(doc)))

        return where

    # ------------------------------------------------------------------ writing
    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> List[str]:
        """Nodes -> memory documents under their node ids (an existing id is replaced in one step).

        The routed text is what an embedding store would embed (`MetadataMode.EMBED`: text plus the
        metadata not excluded from embedding)."""
        _no_kwargs("add", add_kwargs)
        texts, ids, metadata = [], [], []
        for node in nodes:
            text = node.get_content(metadata_mode=MetadataMode.EMBED)
            if not text.strip():
                logger.warning("node %s has no text to route on; it was not stored", node.node_id)
                continue
            if node.embedding and not self._warned_embeddings:
                self._warned_embeddings = True
                logger.warning("MSAVectorStore ignores node embeddings (the model's router ranks the text); pass "
                               "embed_model=NoEmbedding() to stop computing them")
            texts.append(text)
            ids.append(node.node_id)
            metadata.append(node_to_metadata_dict(node, remove_text=False, flat_metadata=False))
        if texts:
            self._engine.upsert(texts, ids, metadata=metadata, progress=False, **self._coll())
        return ids

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete the nodes of one source document (`ref_doc_id`), as every LlamaIndex vector store does."""
        _no_kwargs("delete", delete_kwargs)
        self._delete(self._select(self._where(doc_ids=[ref_doc_id])))

    def delete_nodes(self, node_ids: Optional[List[str]] = None, filters: Optional[MetadataFilters] = None,
                     **delete_kwargs: Any) -> None:
        """Delete nodes by id and/or metadata filters (ids not in this collection are ignored)."""
        _no_kwargs("delete_nodes", delete_kwargs)
        if node_ids is None and filters is None:
            raise InvalidArgumentError("delete_nodes needs node_ids or filters; use clear() to delete every node")
        if node_ids is not None and not node_ids:
            return
        self._delete(self._select(self._where(node_ids=node_ids, filters=filters)))

    def clear(self) -> None:
        """Delete every node of this store's collection (other collections are untouched)."""
        self._delete(self._select())

    def _delete(self, ids: List[str]) -> None:
        if ids:
            # a concurrent delete may have removed some already
            self._engine.delete(ids, missing_ok=True, **self._coll())

    # ------------------------------------------------------------------ reading
    def get_nodes(self, node_ids: Optional[List[str]] = None,
                  filters: Optional[MetadataFilters] = None) -> List[BaseNode]:
        """This collection's nodes by id (in the order asked) and/or filters (in storage order)."""
        if node_ids is not None and not node_ids:
            return []  # no ids asked for: no node (as delete_nodes([]) deletes none)
        snap = self._engine.snapshot()
        ids = snap.select(self._where(node_ids=node_ids, filters=filters), collection=self.collection_name)
        first_part = {}  # node id -> its document (a node stored in parts: its first part, which carries it whole)
        for d in snap.get(ids) if ids else []:
            first_part.setdefault(d.whole_id, d)
        order = [i for i in dict.fromkeys(node_ids) if i in first_part] if node_ids else list(first_part)
        return [node_from_document(first_part[i]) for i in order]

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Route `query.query_str` to the `similarity_top_k` best nodes of this collection that the
        filters, `node_ids` and `doc_ids` admit (filtering happens before routing); in MMR mode, re-rank
        more routed candidates for diversity (see the module doc)."""
        mmr = check_query(query.mode, kwargs, query.mmr_threshold)
        for name in ("alpha", "sparse_top_k", "hybrid_top_k", "output_fields", "embedding_field"):
            if getattr(query, name, None) is not None:
                raise InvalidArgumentError(f"{name}={getattr(query, name)!r} applies to hybrid / sparse vector "
                                           "search, which MSAVectorStore does not do; drop it")
        if query.query_str is None:
            raise InvalidArgumentError("MSAVectorStore routes on the query text: VectorStoreQuery.query_str is "
                                       "required (a query_embedding alone cannot be routed)")
        check_text(query.query_str, "query")
        where = self._where(node_ids=query.node_ids, doc_ids=query.doc_ids, filters=query.filters)
        if mmr is None:
            k = self._engine.answer_defaults.merged(k=query.similarity_top_k).k
            routed = self._route_nodes(query.query_str, k, where, self._engine.snapshot())
        else:
            routed = self._mmr(query, where, *mmr)
        # each routed document is a distinct node (a part of a long node carries the whole node)
        nodes = [node_from_document(d) for d in routed]
        return VectorStoreQueryResult(nodes=nodes, similarities=[float(d.score) for d in routed],
                                      ids=[n.node_id for n in nodes])

    def _route_nodes(self, query_str: str, k: int, where, snap) -> list:
        """The routed documents of the k best nodes, each node once at its best part (a node longer than the
        window is stored in parts, each carrying the whole node)."""
        return self._engine.retrieve(query_str, k=k, where=where, snapshot=snap, whole_texts=True, **self._coll())

    def _mmr(self, query: VectorStoreQuery, where, threshold: Optional[float], prefetch_k: Optional[int],
             prefetch_factor: float) -> list:
        """The routed documents MMR picks, in pick order: the fetched candidates re-ranked by LlamaIndex's
        `get_top_k_mmr_embeddings`, fed candidate indices so that it reads the routing scores as relevance
        and document-vector cosines as redundancy."""
        top_k = self._engine.answer_defaults.merged(k=query.similarity_top_k).k
        fetch_k = max(prefetch_k if prefetch_k is not None else int(top_k * prefetch_factor), top_k)
        snap = self._engine.snapshot()  # one view: a concurrent delete cannot drop a candidate's vector
        candidates = self._route_nodes(query.query_str, fetch_k, where, snap)  # distinct nodes: MMR fills top_k
        if not candidates:
            return []
        scores = [float(d.score) for d in candidates]
        low, span = min(scores), max(scores) - min(scores)
        # routing scores span ~0.1-0.4 and document cosines ~0-1: rescale relevance to [0, 1] over the
        # candidates so that mmr_threshold weighs two quantities on one scale
        relevance = [(s - low) / span if span > 0 else 1.0 for s in scores]
        vectors = self._engine.document_vectors([d.id for d in candidates], snapshot=snap)  # [n, L*G*D], unit rows
        cosine = (vectors @ vectors.T).tolist()  # [n, n]
        query_index = -1

        def similarity(a: List[int], b: List[int]) -> float:  # a, b: [candidate index], -1 for the query
            return relevance[b[0]] if a[0] == query_index else cosine[a[0]][b[0]]

        _, picked = get_top_k_mmr_embeddings([query_index], [[i] for i in range(len(candidates))],
                                             similarity_fn=similarity, similarity_top_k=top_k,
                                             embedding_ids=list(range(len(candidates))), mmr_threshold=threshold)
        return [candidates[i] for i in picked]

    # ------------------------------------------------------------------ persistence
    def persist(self, persist_path: str, fs: Any = None) -> None:
        """`storage_context.persist(persist_dir)` calls this: the engine's memory goes to
        `<persist_dir>/msa_memory/` (`<namespace>__msa_memory/` for a namespace other than "default"), and `persist_path` gets a marker that makes LlamaIndex's own loader
        fail with a message naming `load_msa_index` (it cannot know the engine)."""
        if fs is not None and getattr(fs, "protocol", "file") not in ("file", ("file", "local"), "local"):
            raise NotImplementedError("MSA memory persists to a local folder only; persist without fs=")
        folder, memory_dir = Path(persist_path).parent, memory_dir_for(persist_path)
        self._engine.save(str(folder / memory_dir))
        # SimpleVectorStoreData.from_dict turns each listed value into a float: LlamaIndex's loader then raises
        # ValueError("could not convert string to float: '<LOAD_HINT>'"), so the hint reaches the user.
        marker = {"embedding_dict": {"__msa_memory__": [LOAD_HINT]},
                  MARKER_KEY: {"format": 1, "memory_dir": memory_dir, "collection_name": self.collection_name}}
        with open(persist_path, "w", encoding="utf-8") as f:
            json.dump(marker, f)

    @classmethod
    def from_persist_dir(cls, persist_dir: str, engine: MSAEngine, replace: bool = False,
                         namespace: str = "default") -> "MSAVectorStore":
        """The store persisted in `persist_dir`, with its memory loaded into `engine`.

        Loading a memory replaces what the engine holds, so an engine that already holds documents is
        refused unless `replace=True`. When the engine still holds the persisted memory (same process),
        open the store without loading: `MSAVectorStore(engine, collection_name=...)`."""
        marker_path = os.path.join(persist_dir, f"{namespace}__vector_store.json")
        try:
            with open(marker_path, encoding="utf-8") as f:
                info = json.load(f).get(MARKER_KEY)
        except FileNotFoundError:
            info = None
        memory_dir = os.path.join(persist_dir, (info or {}).get("memory_dir", MEMORY_DIR))
        if info is None or not os.path.isdir(memory_dir):
            raise FileNotFoundError(f"{persist_dir!r} holds no MSA memory ({MEMORY_DIR}/ and {namespace}__vector_store.json "
                                    "from MSAVectorStore.persist); persist an index over an MSAVectorStore with "
                                    "index.storage_context.persist(persist_dir)")
        if info.get("format") != 1:
            raise MemoryFormatError(f"unknown MSA persist format {info.get('format')!r} in {marker_path}")
        if len(engine) and not replace:
            raise InvalidArgumentError(
                f"the engine already holds {len(engine)} documents, and loading {persist_dir!r} would replace "
                "its whole memory: use a fresh engine, pass replace=True, or (when this engine still holds "
                "the persisted memory) open it without loading: MSAVectorStore(engine, collection_name="
                f"{info['collection_name']!r})")
        engine.load(memory_dir)
        return cls(engine, collection_name=info["collection_name"])


def memory_dir_for(persist_path: str) -> str:
    """The memory's folder beside `persist_path`: `msa_memory` for LlamaIndex's default namespace
    (`default__vector_store.json`), `<namespace>__msa_memory` for another one, so that the stores of one
    StorageContext (`add_vector_store(store, namespace=...)`) never save over each other's memory."""
    name = Path(persist_path).name
    suffix = "__vector_store.json"  # llama_index.core.storage: f"{namespace}{NAMESPACE_SEP}{DEFAULT_PERSIST_FNAME}"
    namespace = name[:-len(suffix)] if name.endswith(suffix) else Path(name).stem
    return MEMORY_DIR if namespace == "default" else f"{namespace}__{MEMORY_DIR}"


def check_query(mode: Any, kwargs: dict, mmr_threshold: Optional[float] = None):
    """Refuse query modes and vector_store_kwargs the router cannot honour (checked where they are given).
    -> None for the default mode, or MMR's (threshold, prefetch_k, prefetch_factor); `mmr_threshold` is
    `VectorStoreQuery.mmr_threshold` (a `vector_store_kwargs` value wins, as LlamaIndex's stores read it)."""
    mode = VectorStoreQueryMode(mode) if mode is not None else VectorStoreQueryMode.DEFAULT
    if mode not in (VectorStoreQueryMode.DEFAULT, VectorStoreQueryMode.MMR):
        raise InvalidArgumentError(f"vector_store_query_mode={mode.value!r} is not supported by MSAVectorStore "
                                   "(it routes with the model, no sparse, hybrid or learner search); use the "
                                   "default mode or 'mmr'")
    given = [k for k in MMR_KWARGS if k in kwargs] + ["mmr_threshold"] * (mmr_threshold is not None)
    if mode != VectorStoreQueryMode.MMR:
        if given:
            raise InvalidArgumentError(f"{sorted(set(given))} apply to vector_store_query_mode='mmr' only; add "
                                       "it (as_retriever(vector_store_query_mode='mmr', vector_store_kwargs=...)) "
                                       "or drop them")
        _no_kwargs("query", kwargs)
        return None
    kwargs = dict(kwargs)
    threshold = kwargs.pop("mmr_threshold", mmr_threshold)
    prefetch_k = kwargs.pop("mmr_prefetch_k", None)
    factor = kwargs.pop("mmr_prefetch_factor", None)
    _no_kwargs("query", kwargs)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or math.isnan(threshold) or not 0.0 <= threshold <= 1.0):
        raise InvalidArgumentError(f"mmr_threshold must be a number in [0, 1] (1: relevance only, 0: diversity "
                                   f"only), got {threshold!r}")
    if prefetch_k is not None and factor is not None:
        raise InvalidArgumentError("give mmr_prefetch_k (how many candidates) or mmr_prefetch_factor (times "
                                   "similarity_top_k), not both")
    if prefetch_k is not None:
        prefetch_k = check_int(prefetch_k, "mmr_prefetch_k", minimum=1)
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                               or math.isnan(factor) or factor <= 0):
        raise InvalidArgumentError(f"mmr_prefetch_factor must be a positive number (candidates = "
                                   f"similarity_top_k * factor, at least similarity_top_k), got {factor!r}")
    return (None if threshold is None else float(threshold), prefetch_k,
            DEFAULT_MMR_PREFETCH_FACTOR if factor is None else float(factor))


def _no_kwargs(method: str, kwargs: dict) -> None:
    if kwargs:
        raise InvalidArgumentError(f"MSAVectorStore.{method} got unsupported arguments {sorted(kwargs)}; "
                                   "nothing was done")


def node_from_document(doc) -> BaseNode:
    """A memory document (`MemoryDocument` / `RoutedDocument`) -> the LlamaIndex node it was stored from,
    else (a document added outside LlamaIndex) a `TextNode` of its text and metadata."""
    if "_node_content" in doc.metadata:
        return metadata_dict_to_node(doc.metadata)
    return TextNode(id_=doc.id, text=doc.text, metadata=dict(doc.metadata))
