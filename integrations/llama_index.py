"""LlamaIndex surfaces for an `MSAEngine`: a drop-in for `VectorStoreIndex` and friends.

    # before                                               # after
    index = VectorStoreIndex.from_documents(docs,          index = MSAIndex.from_documents(docs, engine=engine)
                embed_model=embed)
    qe = index.as_query_engine(llm=llm)                    qe = index.as_query_engine()
    index.storage_context.persist("storage")               index.storage_context.persist("storage")
    load_index_from_storage(StorageContext.from_defaults(  load_msa_index("storage", engine)
        persist_dir="storage"), embed_model=embed)

`MSAIndex` keeps LlamaIndex's docstore (node ids, ref-doc ids, hashes, metadata) and puts every node's text
into the engine's memory bank under the node id. Answering is retriever-free: the model's router picks
the documents (`Response.source_nodes`, routing order, routing scores). `MetadataFilters` become an
allow-list of document ids applied before routing.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen,
                                              CompletionResponse, CompletionResponseAsyncGen,
                                              CompletionResponseGen, LLMMetadata, MessageRole)
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager
from llama_index.core.data_structs.data_structs import IndexDict
from llama_index.core.indices.base import BaseIndex
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.memory.memory import BaseMemoryBlock
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TextNode
from llama_index.core.storage.docstore.types import RefDocInfo
from llama_index.core.storage.storage_context import StorageContext
from llama_index.core.vector_stores.types import BasePydanticVectorStore, MetadataFilters
from llama_index.core.vector_stores.utils import build_metadata_filter_fn
from pydantic import ConfigDict, Field, PrivateAttr

from ..core import MSAEngine, check_text

MEMORY_DIR = "msa_memory"  # the engine's bank, inside a LlamaIndex persist_dir
MSA_STORE_NAME = "msa"  # the name of the shim in StorageContext.vector_stores

__all__ = ["MSAIndex", "MSAQueryEngine", "MSARetriever", "MSALLM", "MSAMemoryBlock", "MSAMemoryVectorStore",
           "load_msa_index", "filters_to_allow_ids"]


# ---------------------------------------------------------------------------------------------- filters
def filters_to_allow_ids(engine: MSAEngine, filters: Optional[MetadataFilters], state=None) -> Optional[list]:
    """`MetadataFilters` -> the ids of the memory documents whose metadata matches (None: no filter)."""
    if filters is None:
        return None
    if isinstance(filters, dict):
        filters = MetadataFilters.from_dicts([{"key": k, "value": v} for k, v in filters.items()]) \
            if all(isinstance(k, str) for k in filters) else _bad_filter(filters)
    if not isinstance(filters, MetadataFilters):
        raise TypeError(f"filters must be a llama_index MetadataFilters, got {type(filters).__name__}")
    for f in filters.filters:
        key = getattr(f, "key", None)
        if not isinstance(f, MetadataFilters) and not isinstance(key, str):
            raise TypeError(f"metadata filter keys must be str, got {key!r}")
    state = state if state is not None else engine.memory.state
    fn = build_metadata_filter_fn(lambda i: state.metadata[i], filters)
    allowed = []
    for i in range(len(state)):
        try:
            ok = fn(i)
        except TypeError as e:
            raise TypeError(f"metadata filter {filters.filters!r} cannot be compared with document "
                            f"{state.ids[i]!r}'s metadata {state.metadata[i]!r}: {e}") from e
        if ok:
            allowed.append(state.ids[i])
    return allowed


def _bad_filter(filters):
    raise TypeError(f"metadata filter keys must be str, got {[k for k in filters if not isinstance(k, str)]}")


def _question(query) -> str:
    if isinstance(query, QueryBundle):
        query = query.query_str
    if not isinstance(query, str):
        raise TypeError(f"the query must be a str or QueryBundle, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("the query is empty; ask something")
    return query


def _node_for(index: Optional["MSAIndex"], doc) -> BaseNode:
    """The original node (from the index's docstore) of a routed memory document, else a TextNode."""
    if index is not None:
        node = index.docstore.get_node(doc.id, raise_error=False)
        if node is not None:
            return node
    meta = {k: v for k, v in doc.metadata.items() if k != "ref_doc_id"}
    return TextNode(id_=doc.id, text=doc.text, metadata=meta)


# ---------------------------------------------------------------------------------------------- retriever
class MSARetriever(BaseRetriever):
    """Routes a query to memory documents with the model's router (no embeddings)."""

    def __init__(self, engine: MSAEngine, index: Optional["MSAIndex"] = None, similarity_top_k: Optional[int] = None,
                 filters: Optional[MetadataFilters] = None, callback_manager: Optional[CallbackManager] = None,
                 **kwargs: Any):
        self._engine = engine
        self._index = index
        self._k = similarity_top_k or engine.config.k
        self._filters = filters
        filters_to_allow_ids(engine, filters, state=_EMPTY) if filters is not None else None  # validate early
        super().__init__(callback_manager=callback_manager, verbose=kwargs.get("verbose", False))

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        question = _question(query_bundle)
        state = self._engine.memory.state
        if len(state) == 0:
            return []
        allow = filters_to_allow_ids(self._engine, self._filters, state=state)
        if allow is not None and not allow:
            return []
        routing = self._engine.route(question, k=self._k, allow_ids=allow, state=state)
        out = []
        for rank, (row, score) in enumerate(zip(routing.rows, routing.scores)):
            doc = _Doc(state.ids[row], state.texts[row], dict(state.metadata[row]))
            out.append(NodeWithScore(node=_node_for(self._index, doc), score=float(score)))
        return out

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


class _Doc:
    def __init__(self, id, text, metadata):
        self.id, self.text, self.metadata = id, text, metadata


class _EmptyState:
    ids = texts = metadata = ()

    def __len__(self):
        return 0


_EMPTY = _EmptyState()


# ---------------------------------------------------------------------------------------------- query engine
class MSAQueryEngine(BaseQueryEngine):
    """Retriever-free answering: the engine routes and answers in one call.

    `Response.source_nodes` are the routed documents in routing order with their routing scores;
    `Response.metadata` holds `timings`, `usage` (prompt/completion/total tokens), `mode`, `finish_reason`.
    """

    def __init__(self, engine: MSAEngine, index: Optional["MSAIndex"] = None, streaming: bool = False,
                 filters: Optional[MetadataFilters] = None, similarity_top_k: Optional[int] = None,
                 mode: Optional[str] = None, max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 rounds: Optional[int] = None, system_prompt: Optional[str] = None, seed: Optional[int] = None,
                 callback_manager: Optional[CallbackManager] = None, **kwargs: Any):
        if filters is not None:
            filters_to_allow_ids(engine, filters, state=_EMPTY)  # type-check now, not at the first query
        self._engine, self._index, self._streaming, self._filters = engine, index, streaming, filters
        self._kw = dict(mode=mode, k=similarity_top_k, max_new_tokens=max_new_tokens, temperature=temperature,
                        rounds=rounds, system=system_prompt, seed=seed)
        super().__init__(callback_manager=callback_manager)

    def _get_prompt_modules(self) -> Dict[str, Any]:
        return {}

    def retrieve(self, query_bundle) -> List[NodeWithScore]:
        """The routed documents alone (what `query` would answer from), without generating."""
        if isinstance(query_bundle, str):
            query_bundle = QueryBundle(query_bundle)
        return MSARetriever(self._engine, index=self._index, similarity_top_k=self._kw["k"],
                            filters=self._filters)._retrieve(query_bundle)

    def _source_nodes(self, documents) -> List[NodeWithScore]:
        return [NodeWithScore(node=_node_for(self._index, d), score=float(d.score)) for d in documents]

    def _query(self, query_bundle: QueryBundle):
        question = _question(query_bundle)
        state = self._engine.memory.state
        allow = filters_to_allow_ids(self._engine, self._filters, state=state)
        if allow is not None and not allow:
            return Response("Empty Response", source_nodes=[], metadata={"timings": {}, "usage": {
                "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, "note": "no document matches the filters"})
        stream = self._engine.stream(question, allow_ids=allow, **self._kw)
        sources = self._source_nodes(stream.documents)
        if self._streaming:
            metadata: dict = {}

            def gen():
                for piece in stream:
                    yield piece
                metadata.update(_result_metadata(stream.result))

            return StreamingResponse(response_gen=gen(), source_nodes=sources, metadata=metadata)
        for _ in stream:
            pass
        return Response(stream.result.answer, source_nodes=sources, metadata=_result_metadata(stream.result))

    async def _aquery(self, query_bundle: QueryBundle):
        if self._streaming:  # an async generator that pulls each piece in a worker thread
            resp = await asyncio.to_thread(self._query, query_bundle)
            sync_gen = resp.response_gen
            sentinel = object()

            async def agen():
                while True:
                    piece = await asyncio.to_thread(next, sync_gen, sentinel)
                    if piece is sentinel:
                        return
                    yield piece

            from llama_index.core.base.response.schema import AsyncStreamingResponse
            return AsyncStreamingResponse(response_gen=agen(), source_nodes=resp.source_nodes,
                                          metadata=resp.metadata)
        return await asyncio.to_thread(self._query, query_bundle)


def _result_metadata(result) -> dict:
    return {"timings": dict(result.timings), "usage": result.usage, "mode": result.mode,
            "finish_reason": result.finish_reason,
            "routed": [{"id": d.id, "score": d.score, "round": d.round, "rank": d.rank} for d in result.documents]}


# ---------------------------------------------------------------------------------------------- storage shim
class MSAMemoryVectorStore(BasePydanticVectorStore):
    """Sits in `StorageContext.vector_stores["msa"]` so that `storage_context.persist(persist_dir)` also
    saves the engine's memory bank (to `<persist_dir>/msa_memory/`). It is not a vector store you query:
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
            raise NotImplementedError("MSA memory persists to a local folder only")
        self._engine.save(str(Path(persist_path).parent / MEMORY_DIR))


# ---------------------------------------------------------------------------------------------- index
class MSAIndex(BaseIndex[IndexDict]):
    """`VectorStoreIndex`'s interface over an MSAEngine's memory (node id = memory document id)."""

    index_struct_cls = IndexDict

    def __init__(self, nodes: Optional[Sequence[BaseNode]] = None, engine: Optional[MSAEngine] = None,
                 index_struct: Optional[IndexDict] = None, storage_context: Optional[StorageContext] = None,
                 show_progress: bool = False, **kwargs: Any):
        if engine is None:
            raise TypeError("MSAIndex needs engine=MSAEngine.from_pretrained(...)")
        self._engine = engine
        self._lock = threading.RLock()
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
            raise TypeError("MSAIndex.from_documents needs engine=MSAEngine.from_pretrained(...)")
        return super().from_documents(documents, storage_context=storage_context, show_progress=show_progress,
                                      callback_manager=callback_manager, transformations=transformations,
                                      engine=engine, **kwargs)

    @property
    def engine(self) -> MSAEngine:
        return self._engine

    # ------------------------------------------------------------------ writing
    def _add_to_engine(self, nodes: Sequence[BaseNode]) -> None:
        nodes = [n for n in nodes if n.get_content(metadata_mode=MetadataMode.NONE).strip()]
        if not nodes:
            return
        texts = [n.get_content(metadata_mode=MetadataMode.LLM) for n in nodes]
        metas = []
        for n in nodes:
            meta = dict(n.metadata)
            if n.ref_doc_id is not None:
                meta["ref_doc_id"] = n.ref_doc_id
            metas.append(meta)
        with self._lock:  # LlamaIndex semantics: re-inserting a node id replaces it (in one step)
            self._engine.replace(texts, ids=[n.node_id for n in nodes], metadata=metas, progress=self._show_progress)

    def _build_index_from_nodes(self, nodes: Sequence[BaseNode], **build_kwargs: Any) -> IndexDict:
        struct = IndexDict()
        self._add_to_engine(nodes)
        for n in nodes:
            struct.add_node(n, text_id=n.node_id)
        return struct

    def _insert(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> None:
        self._add_to_engine(nodes)
        for n in nodes:
            self._index_struct.add_node(n, text_id=n.node_id)

    def _delete_node(self, node_id: str, **delete_kwargs: Any) -> None:
        with self._lock:
            if node_id in self._engine.memory:
                self._engine.delete([node_id])
            self._index_struct.delete(node_id)

    def delete_nodes(self, node_ids: List[str], delete_from_docstore: bool = False, **delete_kwargs: Any) -> None:
        unknown = [i for i in node_ids if i not in self._index_struct.nodes_dict]
        if unknown:
            raise KeyError(f"unknown node id(s) {unknown[:5]}; nothing was deleted")
        super().delete_nodes(node_ids, delete_from_docstore=delete_from_docstore, **delete_kwargs)

    @property
    def ref_doc_info(self) -> Dict[str, RefDocInfo]:
        node_ids = list(self._index_struct.nodes_dict.values())
        nodes = self.docstore.get_nodes(node_ids, raise_error=False)
        out: Dict[str, RefDocInfo] = {}
        for n in nodes:
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
        """Retriever-free MSA answering. Passing `llm=` another LLM falls back to LlamaIndex's
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

    def as_query_engine_for_chat(self, **kwargs):  # pragma: no cover - alias for symmetry
        return self.as_query_engine(**kwargs)


def load_msa_index(persist_dir: str, engine: MSAEngine, index_id: Optional[str] = None) -> MSAIndex:
    """Counterpart of `load_index_from_storage(StorageContext.from_defaults(persist_dir=...))`."""
    memory_dir = os.path.join(persist_dir, MEMORY_DIR)
    if not os.path.isdir(memory_dir):
        raise FileNotFoundError(f"{persist_dir!r} holds no MSA memory ({MEMORY_DIR}/); was it persisted from an "
                                "MSAIndex's storage_context?")
    engine.load(memory_dir)
    from llama_index.core.vector_stores.simple import SimpleVectorStore
    storage_context = StorageContext.from_defaults(
        persist_dir=persist_dir,
        vector_stores={"default": SimpleVectorStore(), MSA_STORE_NAME: MSAMemoryVectorStore(engine)})
    structs = storage_context.index_store.index_structs()
    if index_id is not None:
        struct = storage_context.index_store.get_index_struct(index_id)
        if struct is None:
            raise ValueError(f"no index with id {index_id!r} in {persist_dir!r}")
    elif len(structs) != 1:
        raise ValueError(f"{persist_dir!r} holds {len(structs)} indices; pass index_id=")
    else:
        struct = structs[0]
    return MSAIndex(index_struct=struct, storage_context=storage_context, engine=engine)


# ---------------------------------------------------------------------------------------------- LLM
def _messages(messages: Sequence[ChatMessage]) -> list:
    out = []
    for m in messages:
        content = m.content
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise TypeError(f"message content must be text, got {type(content).__name__}")
        role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
        if role not in ("system", "user", "assistant"):
            role = "user" if role != "model" else "assistant"
        out.append({"role": role, "content": content})
    return out


class MSALLM(CustomLLM):
    """The engine's model as a plain LlamaIndex LLM (no memory): complete/chat, streaming, async in a worker
    thread so the event loop keeps running. `raw` of each response holds `timings` and `usage`."""

    engine: Any = Field(description="the MSAEngine")
    max_new_tokens: Optional[int] = Field(default=None)
    temperature: Optional[float] = Field(default=None)
    seed: Optional[int] = Field(default=None)
    model_config = ConfigDict(arbitrary_types_allowed=True)

    @classmethod
    def class_name(cls) -> str:
        return "MSALLM"

    @property
    def metadata(self) -> LLMMetadata:
        m = self.engine.model
        return LLMMetadata(context_window=int(getattr(m, "max_positions", 2048) or 2048),
                           num_output=int(self.max_new_tokens or self.engine.config.max_new_tokens),
                           is_chat_model=True, is_function_calling_model=False, model_name=self.engine.name)

    def _gen_kwargs(self, kwargs) -> dict:
        return dict(max_new_tokens=kwargs.get("max_new_tokens", self.max_new_tokens),
                    temperature=kwargs.get("temperature", self.temperature), stop=kwargs.get("stop"),
                    seed=kwargs.get("seed", self.seed))

    @staticmethod
    def _raw(res) -> dict:
        return {"timings": dict(res.timings), "finish_reason": res.finish_reason,
                "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                          "total_tokens": res.prompt_tokens + res.completion_tokens}}

    @staticmethod
    def _check_prompt(prompt) -> str:
        return check_text(prompt, "prompt")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        res = self.engine.generate(self._check_prompt(prompt), **self._gen_kwargs(kwargs))
        return CompletionResponse(text=res.text, raw=self._raw(res))

    def _stream(self, messages, kwargs):
        from ..engine.generation import GenerationStats
        import time
        stats = GenerationStats()
        t0 = time.perf_counter()
        text = ""
        for piece in self.engine.stream_generate(messages, stats=stats, **self._gen_kwargs(kwargs)):
            text += piece
            yield text, piece, None
        res = type("R", (), dict(timings={"prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
                                          "first_token_s": stats.first_token_s, "total_s": time.perf_counter() - t0},
                                 finish_reason=stats.finish_reason, prompt_tokens=stats.prompt_tokens,
                                 completion_tokens=stats.completion_tokens))
        yield text, "", self._raw(res)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        prompt = self._check_prompt(prompt)

        def gen():
            for text, piece, raw in self._stream(prompt, kwargs):
                yield CompletionResponse(text=text, delta=piece, raw=raw)
        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        res = self.engine.generate(_messages(messages), **self._gen_kwargs(kwargs))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=res.text), raw=self._raw(res))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        msgs = _messages(messages)

        def gen():
            for text, piece, raw in self._stream(msgs, kwargs):
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece, raw=raw)
        return gen()

    # async: every call runs in a worker thread; streams pull each piece in a worker thread
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        gen = await asyncio.to_thread(self.stream_complete, prompt, formatted, **kwargs)
        return _athread(gen)

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        gen = await asyncio.to_thread(self.stream_chat, messages, **kwargs)
        return _athread(gen)


async def _athread(gen):
    sentinel = object()
    while True:
        item = await asyncio.to_thread(next, gen, sentinel)
        if item is sentinel:
            return
        yield item


# ---------------------------------------------------------------------------------------------- agent memory
class MSAMemoryBlock(BaseMemoryBlock[str]):
    """Long-term memory block for `llama_index.core.memory.Memory`: chat turns flushed out of short-term memory
    go into the engine's bank (scope `scope`, one memory document per message); `aget` returns the routed
    memories for the latest user message as text."""

    engine: Any = Field(description="the MSAEngine holding the memories")
    scope: str = Field(default="default", description="memory scope; blocks with different scopes never mix")
    k: int = Field(default=3)
    accept_short_term_memory: bool = Field(default=True)
    model_config = ConfigDict(arbitrary_types_allowed=True)

    def _scope_ids(self, state) -> list:
        return [state.ids[i] for i in range(len(state))
                if state.metadata[i].get("msa_memory_scope") == self.scope]

    def _get_sync(self, messages: Optional[List[ChatMessage]]) -> str:
        question = None
        for m in reversed(messages or []):
            if m.role == MessageRole.USER and isinstance(m.content, str) and m.content.strip():
                question = m.content
                break
        if question is None:
            return ""
        state = self.engine.memory.state
        allow = self._scope_ids(state)
        if not allow:
            return ""
        routing = self.engine.route(question, k=self.k, allow_ids=allow, state=state)
        return "\n".join(state.texts[r] for r in routing.rows)

    async def _aget(self, messages: Optional[List[ChatMessage]] = None, **block_kwargs: Any) -> str:
        return await asyncio.to_thread(self._get_sync, messages)

    def _put_sync(self, messages: List[ChatMessage]) -> None:
        texts, metas = [], []
        for m in messages:
            content = m.content
            if not isinstance(content, str) or not content.strip():
                continue
            role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
            texts.append(f"{role}: {content}")
            metas.append({"msa_memory_scope": self.scope, "role": role})
        if texts:
            self.engine.add(texts, metadata=metas, progress=False)

    async def _aput(self, messages: List[ChatMessage]) -> None:
        await asyncio.to_thread(self._put_sync, messages)
