"""`MSAIndex`: a `VectorStoreIndex` over an `MSAVectorStore`, wired for an engine; `load_msa_index` loads one
back from a persist dir.

Everything LlamaIndex's `VectorStoreIndex` does works as it does there (insert, delete_ref_doc, refresh,
persist, retrievers, query and chat engines, instrumentation). `MSAIndex` only adds the defaults an MSA app
wants and checks what a plain index silently accepts:
- the vector store is `MSAVectorStore(engine, collection_name)` and the embed model `NoEmbedding()`;
- the LLM of query and chat engines is `MSALLM(engine)` unless you pass one (never `Settings.llm`/OpenAI);
- unknown keyword arguments of `as_retriever` / `as_query_engine` / `as_chat_engine` raise instead of
  being ignored, and the query mode and its `vector_store_kwargs` (MMR's) are checked where they are given;
- `as_query_engine(mode=...)` gives `MSAQueryEngine`, MSA's retriever-free answering (needed for the
  `sparse` and `protocol` modes, where the documents are not pasted into a prompt).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Optional, Sequence

from llama_index.core import get_response_synthesizer
from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.chat_engine import (CondensePlusContextChatEngine, CondenseQuestionChatEngine,
                                          ContextChatEngine, SimpleChatEngine)
from llama_index.core.chat_engine.types import ChatMode
from llama_index.core.indices.vector_store.base import VectorStoreIndex
from llama_index.core.indices.vector_store.retrievers import VectorIndexRetriever
from llama_index.core.query_engine.retriever_query_engine import RetrieverQueryEngine
from llama_index.core.schema import BaseNode
from llama_index.core.storage.storage_context import StorageContext
from llama_index.core.vector_stores.simple import SimpleVectorStore

from msa_plugins import InvalidArgumentError, InvalidTypeError, MSAEngine

from ._collections import DEFAULT_COLLECTION
from .filters import filters_to_predicate
from .llms import MSALLM
from .query_engine import MSAQueryEngine
from .retrievers import query_text
from .vector_stores import MEMORY_DIR, MSAVectorStore, NoEmbedding, check_query

__all__ = ["MSAIndex", "load_msa_index", "MEMORY_DIR"]

# MSAQueryEngine's own arguments: asking for one of them (with mode=) selects retriever-free answering
_MSA_ANSWER_ARGS = ("mode", "rounds", "k_per_round", "rerank", "system_prompt")
_GENERATION_ARGS = ("max_new_tokens", "temperature", "seed")  # set on the default MSALLM


class MSAIndexRetriever(VectorIndexRetriever):
    """`MSAIndex.as_retriever()`: LlamaIndex's own retriever over the MSA vector store, which refuses a query
    bundle asking for other search text (HyDE's `custom_embedding_strs`): LlamaIndex drops those strings for a
    store that routes text, and the app would silently get the answer to another query."""

    def _retrieve(self, query_bundle):
        query_text(query_bundle)
        return super()._retrieve(query_bundle)

    async def _aretrieve(self, query_bundle):
        query_text(query_bundle)
        return await super()._aretrieve(query_bundle)


def _params(*fns) -> set:
    return {name for fn in fns for name, p in inspect.signature(fn).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in ("self", "cls")}


# what LlamaIndex reads from as_retriever / as_query_engine kwargs (computed from its own signatures)
_RETRIEVER_ARGS = _params(VectorIndexRetriever.__init__) - {"index"} | {"vector_store_kwargs"}
_QUERY_ENGINE_ARGS = _RETRIEVER_ARGS | _params(RetrieverQueryEngine.from_args, get_response_synthesizer) - {"retriever"}
_CHAT_ENGINE_ARGS = {
    ChatMode.CONDENSE_QUESTION: _QUERY_ENGINE_ARGS | _params(CondenseQuestionChatEngine.from_defaults),
    ChatMode.CONTEXT: _RETRIEVER_ARGS | _params(ContextChatEngine.from_defaults),
    ChatMode.CONDENSE_PLUS_CONTEXT: _RETRIEVER_ARGS | _params(CondensePlusContextChatEngine.from_defaults),
    ChatMode.BEST: _RETRIEVER_ARGS | _params(CondensePlusContextChatEngine.from_defaults),
    ChatMode.SIMPLE: _params(SimpleChatEngine.from_defaults),
}


def _check_kwargs(where: str, kwargs: dict, allowed: set) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise InvalidArgumentError(f"{where} got unknown arguments {unknown}; LlamaIndex would ignore them. "
                                   f"Known: {sorted(allowed)}")


class MSAIndex(VectorStoreIndex):
    """`VectorStoreIndex` over `MSAVectorStore(engine, collection_name)`, with MSA defaults and checked kwargs.

        index = MSAIndex.from_documents(docs, engine=engine, transformations=[splitter])
        index.as_query_engine(similarity_top_k=2, response_mode="tree_summarize").query("...")
        index.storage_context.persist("storage")       # load back with load_msa_index("storage", engine)
    """

    def __init__(self, nodes: Optional[Sequence[BaseNode]] = None, engine: Optional[MSAEngine] = None,
                 collection_name: str = DEFAULT_COLLECTION, storage_context: Optional[StorageContext] = None,
                 index_struct=None, embed_model: Any = None, **kwargs: Any):
        store = storage_context.vector_store if storage_context is not None else None
        if isinstance(store, MSAVectorStore):
            if engine is not None and engine is not store.engine:
                raise InvalidArgumentError("engine= differs from the engine of the storage context's MSAVectorStore")
            engine = store.engine
        elif engine is None:
            raise InvalidTypeError("MSAIndex needs engine=MSAEngine.from_pretrained(...)")
        else:
            if store is not None and not (isinstance(store, SimpleVectorStore) and not store.data.embedding_dict):
                raise InvalidArgumentError(f"MSAIndex stores its nodes in the engine; the storage context already "
                                           f"has a {type(store).__name__} (pass StorageContext.from_defaults("
                                           "vector_store=MSAVectorStore(engine)) or no storage_context)")
            store = MSAVectorStore(engine, collection_name=collection_name)
            if storage_context is None:
                storage_context = StorageContext.from_defaults(vector_store=store)
            else:
                storage_context.add_vector_store(store, namespace="default")
        if embed_model is not None and not isinstance(embed_model, NoEmbedding):
            raise InvalidArgumentError("MSAIndex routes with the model and takes no embed_model (drop it); "
                                       "embeddings would be computed and never read")
        self._engine = engine
        self._unchecked = threading.local()  # as_chat_engine calls as_query_engine with the chat engine's kwargs
        if nodes is None and index_struct is None:
            nodes = []
        super().__init__(nodes=nodes, index_struct=index_struct, storage_context=storage_context,
                         embed_model=NoEmbedding(), **kwargs)

    @classmethod
    def from_documents(cls, documents, storage_context=None, show_progress: bool = False, callback_manager=None,
                       transformations=None, engine: Optional[MSAEngine] = None,
                       collection_name: str = DEFAULT_COLLECTION, **kwargs: Any) -> "MSAIndex":
        if engine is None and not (storage_context is not None
                                   and isinstance(storage_context.vector_store, MSAVectorStore)):
            raise InvalidTypeError("MSAIndex.from_documents needs engine=MSAEngine.from_pretrained(...)")
        return super().from_documents(documents, storage_context=storage_context, show_progress=show_progress,
                                      callback_manager=callback_manager, transformations=transformations,
                                      engine=engine, collection_name=collection_name, **kwargs)

    @property
    def engine(self) -> MSAEngine:
        return self._engine

    @property
    def collection_name(self) -> str:
        return self.vector_store.collection_name

    def _checking(self) -> bool:
        return not getattr(self._unchecked, "on", False)

    # ------------------------------------------------------------------ reading
    def as_retriever(self, **kwargs: Any) -> MSAIndexRetriever:
        if self._checking():
            _check_kwargs("as_retriever", kwargs, _RETRIEVER_ARGS)
        # checked here, not at the first query: k (k=0, k="3"), the filters, the query mode
        if "similarity_top_k" in kwargs:
            self._engine.answer_defaults.merged(k=kwargs["similarity_top_k"])
        filters_to_predicate(kwargs.get("filters"))
        check_query(kwargs.get("vector_store_query_mode"), dict(kwargs.get("vector_store_kwargs") or {}))
        # VectorStoreIndex.as_retriever's own construction, with the retriever that checks the query bundle
        return MSAIndexRetriever(self, node_ids=list(self.index_struct.nodes_dict.values()),
                                 callback_manager=self._callback_manager, object_map=self._object_map, **kwargs)

    def as_query_engine(self, llm: Any = None, **kwargs: Any) -> BaseQueryEngine:
        """LlamaIndex's `RetrieverQueryEngine` (router as retriever, `MSALLM(engine)` unless `llm=`), or
        with `mode=` ("interleave" / "sparse" / "protocol") `MSAQueryEngine`, retriever-free answering."""
        if "mode" in kwargs:
            if llm is not None:
                raise InvalidArgumentError("mode= selects MSA's retriever-free answering, which generates with the "
                                           "engine's model; drop llm= (or drop mode= to use your LLM)")
            return MSAQueryEngine(self._engine, collection_name=self.collection_name,
                                  callback_manager=self._callback_manager, **kwargs)
        misplaced = [k for k in _MSA_ANSWER_ARGS if k in kwargs]
        if misplaced:
            raise InvalidArgumentError(f"{misplaced} apply to MSA's retriever-free answering: pass mode= too "
                                       "(as_query_engine(mode='interleave', ...)); to keep LlamaIndex's synthesis "
                                       "over multi-hop or reranked routing, use RetrieverQueryEngine.from_args("
                                       "MSARetriever(engine, rounds=2, rerank=20), llm=...)")
        generation = {k: kwargs.pop(k) for k in _GENERATION_ARGS if k in kwargs}
        if self._checking():
            _check_kwargs("as_query_engine", kwargs, _QUERY_ENGINE_ARGS)
        if generation and llm is not None:
            raise InvalidArgumentError(f"{sorted(generation)} configure the default MSALLM; set them on your llm instead")
        return super().as_query_engine(llm=llm or MSALLM(engine=self._engine, **generation), **kwargs)

    def as_chat_engine(self, chat_mode: ChatMode = ChatMode.BEST, llm: Any = None, **kwargs: Any):
        """As `VectorStoreIndex.as_chat_engine`, with `MSALLM(engine)` as the default LLM (never OpenAI)."""
        allowed = _CHAT_ENGINE_ARGS.get(ChatMode(chat_mode))
        if allowed is not None:  # other modes: LlamaIndex's own error
            _check_kwargs("as_chat_engine", kwargs, allowed - {"llm", "retriever", "query_engine"})
        self._unchecked.on = True
        try:
            return super().as_chat_engine(chat_mode=chat_mode, llm=llm or MSALLM(engine=self._engine), **kwargs)
        finally:
            self._unchecked.on = False


def load_msa_index(persist_dir: str, engine: MSAEngine, index_id: Optional[str] = None,
                   replace: bool = False, **kwargs: Any) -> MSAIndex:
    """Counterpart of `load_index_from_storage(StorageContext.from_defaults(persist_dir=...))` for an index
    persisted over an `MSAVectorStore`: loads the saved memory into `engine` and the index around it.

    Loading a memory replaces what the engine holds: an engine that already holds documents is refused
    unless `replace=True` (see `MSAVectorStore.from_persist_dir`)."""
    from llama_index.core import load_index_from_storage

    store = MSAVectorStore.from_persist_dir(persist_dir, engine, replace=replace)
    storage_context = StorageContext.from_defaults(persist_dir=persist_dir, vector_store=store)
    index = load_index_from_storage(storage_context, index_id=index_id, embed_model=NoEmbedding())
    return MSAIndex(index_struct=index.index_struct, storage_context=storage_context, **kwargs)
