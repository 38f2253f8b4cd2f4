"""`MSAIndex`: `VectorStoreIndex`'s interface over an engine's memory, `load_msa_index` to load it back, and
the persist shim that makes `storage_context.persist(persist_dir)` save the memory too.

`MSAIndex` keeps LlamaIndex's docstore (node ids, ref-doc ids, hashes, metadata) and puts every node's text
into the engine's memory under the node id. Writes go through `engine.upsert` / `engine.delete`, which
swap the memory atomically; the index's own lock guards only its `index_struct`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.data_structs.data_structs import IndexDict
from llama_index.core.indices.base import BaseIndex
from llama_index.core.schema import BaseNode, MetadataMode
from llama_index.core.storage.docstore.types import RefDocInfo
from llama_index.core.storage.storage_context import StorageContext
from llama_index.core.vector_stores.simple import SimpleVectorStore
from llama_index.core.vector_stores.types import BasePydanticVectorStore, MetadataFilters
from pydantic import ConfigDict, PrivateAttr

from msa_plugins import DocumentNotFoundError, InvalidArgumentError, InvalidTypeError, MSAEngine

from .llms import MSALLM
from .query_engine import MSAQueryEngine
from .retrievers import MSARetriever

MEMORY_DIR = "msa_memory"  # the engine's memory, inside a LlamaIndex persist_dir
MSA_STORE_NAME = "msa"  # the name of the persist shim in StorageContext.vector_stores

__all__ = ["MSAIndex", "MSAMemoryVectorStore", "load_msa_index", "MEMORY_DIR", "MSA_STORE_NAME"]


class MSAMemoryVectorStore(BasePydanticVectorStore):
    """Sits in `StorageContext.vector_stores["msa"]` so that `storage_context.persist(persist_dir)` also
    saves the engine's memory (to `<persist_dir>/msa_memory/`). It is not a vector store you query:
    MSAIndex writes to and routes over the engine directly."""

    stores_text: bool = True
    is_embedding_query: bool = False
    model_config = ConfigDict(arbitrary_types_allowed=True)
    _engine: Any = PrivateAttr()

    def __init__(self, engine: MSAEngine, **kwargs: Any):
        super().__init__(**kwargs)
        self._engine = engine

    @property
    def client(self) -> Any:
        return self._engine

    def add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> List[str]:
        raise NotImplementedError("MSAMemoryVectorStore only persists the engine; add nodes through MSAIndex")

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        raise NotImplementedError("MSAMemoryVectorStore only persists the engine; delete through MSAIndex")

    def query(self, query, **kwargs: Any):
        raise NotImplementedError("MSA memory is queried through MSAIndex.as_retriever / as_query_engine")

    def persist(self, persist_path: str, fs=None) -> None:
        if fs is not None and getattr(fs, "protocol", "file") not in ("file", ("file", "local")):
            raise NotImplementedError("MSA memory persists to a local folder only; persist without fs=")
        self._engine.save(str(Path(persist_path).parent / MEMORY_DIR))


class MSAIndex(BaseIndex[IndexDict]):
    """`VectorStoreIndex`'s interface over an MSAEngine's memory (node id = memory document id).

        index = MSAIndex.from_documents(docs, engine=engine, transformations=[splitter])
        index.as_query_engine(similarity_top_k=2).query("...")
        index.storage_context.persist("storage")        # load back with load_msa_index("storage", engine)
    """

    index_struct_cls = IndexDict

    def __init__(self, nodes: Optional[Sequence[BaseNode]] = None, engine: Optional[MSAEngine] = None,
                 index_struct: Optional[IndexDict] = None, storage_context: Optional[StorageContext] = None,
                 show_progress: bool = False, **kwargs: Any):
        if engine is None:
            raise InvalidTypeError("MSAIndex needs engine=MSAEngine.from_pretrained(...)")
        self._engine = engine
        self._struct_lock = threading.RLock()  # the index_struct only: the engine's writes are atomic
        storage_context = storage_context or StorageContext.from_defaults()
        storage_context.vector_stores[MSA_STORE_NAME] = MSAMemoryVectorStore(engine)
        if nodes is None and index_struct is None:
            nodes = []
        super().__init__(nodes=nodes, index_struct=index_struct, storage_context=storage_context,
                         show_progress=show_progress, **kwargs)

    @classmethod
    def from_documents(cls, documents, storage_context=None, show_progress: bool = False, callback_manager=None,
                       transformations=None, engine: Optional[MSAEngine] = None, **kwargs: Any) -> "MSAIndex":
        if engine is None:
            raise InvalidTypeError("MSAIndex.from_documents needs engine=MSAEngine.from_pretrained(...)")
        return super().from_documents(documents, storage_context=storage_context, show_progress=show_progress,
                                      callback_manager=callback_manager, transformations=transformations,
                                      engine=engine, **kwargs)

    @property
    def engine(self) -> MSAEngine:
        return self._engine

    # ------------------------------------------------------------------ writing
    def _upsert(self, nodes: Sequence[BaseNode]) -> None:
        """Nodes -> memory documents under their node ids; LlamaIndex semantics: re-inserting a node id
        replaces it. Text is what the LLM would see (metadata included), as VectorStoreIndex embeds it."""
        nodes = [n for n in nodes if n.get_content(metadata_mode=MetadataMode.NONE).strip()]
        if not nodes:
            return
        metadata = [dict(n.metadata, **({"ref_doc_id": n.ref_doc_id} if n.ref_doc_id is not None else {}))
                    for n in nodes]
        self._engine.upsert([n.get_content(metadata_mode=MetadataMode.LLM) for n in nodes],
                            ids=[n.node_id for n in nodes], metadata=metadata, progress=self._show_progress)

    def _build_index_from_nodes(self, nodes: Sequence[BaseNode], **build_kwargs: Any) -> IndexDict:
        struct = IndexDict()
        self._upsert(nodes)
        for n in nodes:
            struct.add_node(n, text_id=n.node_id)
        return struct

    def _insert(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> None:
        self._upsert(nodes)
        with self._struct_lock:
            for n in nodes:
                self._index_struct.add_node(n, text_id=n.node_id)

    def _delete_node(self, node_id: str, **delete_kwargs: Any) -> None:
        self._engine.delete([node_id], missing_ok=True)  # an empty node never reached the memory
        with self._struct_lock:
            self._index_struct.delete(node_id)

    def delete_nodes(self, node_ids: List[str], delete_from_docstore: bool = False, **delete_kwargs: Any) -> None:
        unknown = [i for i in node_ids if i not in self._index_struct.nodes_dict]
        if unknown:
            raise DocumentNotFoundError(f"unknown node id(s) {unknown[:5]}; nothing was deleted "
                                        "(index.index_struct.nodes_dict lists the node ids)")
        super().delete_nodes(node_ids, delete_from_docstore=delete_from_docstore, **delete_kwargs)

    @property
    def ref_doc_info(self) -> Dict[str, RefDocInfo]:
        node_ids = list(self._index_struct.nodes_dict.values())
        out: Dict[str, RefDocInfo] = {}
        for n in self.docstore.get_nodes(node_ids, raise_error=False):
            if n is None or n.ref_doc_id is None:
                continue
            info = self.docstore.get_ref_doc_info(n.ref_doc_id)
            if info is not None:
                out[n.ref_doc_id] = info
        return out

    # ------------------------------------------------------------------ reading
    def as_retriever(self, similarity_top_k: Optional[int] = None, filters: Optional[MetadataFilters] = None,
                     **kwargs: Any) -> MSARetriever:
        return MSARetriever(self._engine, index=self, similarity_top_k=similarity_top_k, filters=filters,
                            callback_manager=self._callback_manager)

    def as_query_engine(self, llm: Any = None, streaming: bool = False, similarity_top_k: Optional[int] = None,
                        filters: Optional[MetadataFilters] = None, **kwargs: Any) -> BaseQueryEngine:
        """Retriever-free MSA answering (`MSAQueryEngine`). Passing `llm=` another LLM gives LlamaIndex's
        RetrieverQueryEngine (MSA routing as the retriever, that LLM as the generator)."""
        if llm is not None and not (isinstance(llm, MSALLM) and llm.engine is self._engine):
            from llama_index.core.query_engine.retriever_query_engine import RetrieverQueryEngine
            return RetrieverQueryEngine.from_args(self.as_retriever(similarity_top_k=similarity_top_k, filters=filters),
                                                  llm=llm, streaming=streaming, **kwargs)
        return MSAQueryEngine(self._engine, index=self, streaming=streaming, filters=filters,
                              similarity_top_k=similarity_top_k, callback_manager=self._callback_manager, **kwargs)

    def as_chat_engine(self, chat_mode="best", llm: Any = None, **kwargs: Any):
        """As VectorStoreIndex.as_chat_engine, with `MSALLM(engine)` as the default LLM (never OpenAI)."""
        return super().as_chat_engine(chat_mode=chat_mode, llm=llm or MSALLM(engine=self._engine), **kwargs)


def load_msa_index(persist_dir: str, engine: MSAEngine, index_id: Optional[str] = None) -> MSAIndex:
    """Counterpart of `load_index_from_storage(StorageContext.from_defaults(persist_dir=...))`: loads the
    memory saved by `storage_context.persist(persist_dir)` into `engine`, and the index around it."""
    memory_dir = os.path.join(persist_dir, MEMORY_DIR)
    if not os.path.isdir(memory_dir):
        raise FileNotFoundError(f"{persist_dir!r} holds no MSA memory ({MEMORY_DIR}/); persist it from an "
                                "MSAIndex's storage_context (index.storage_context.persist(persist_dir))")
    engine.load(memory_dir)
    storage_context = StorageContext.from_defaults(
        persist_dir=persist_dir,
        vector_stores={"default": SimpleVectorStore(), MSA_STORE_NAME: MSAMemoryVectorStore(engine)})
    if index_id is not None:
        struct = storage_context.index_store.get_index_struct(index_id)
        if struct is None:
            raise InvalidArgumentError(f"no index with id {index_id!r} in {persist_dir!r}")
    else:
        structs = storage_context.index_store.index_structs()
        if len(structs) != 1:
            raise InvalidArgumentError(f"{persist_dir!r} holds {len(structs)} indices; pass index_id= "
                                       f"(one of {[s.index_id for s in structs]})")
        struct = structs[0]
    return MSAIndex(index_struct=struct, storage_context=storage_context, engine=engine)
