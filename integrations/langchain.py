"""LangChain / LangGraph surfaces for an `MSAEngine`.

    # before                                              # after
    store = InMemoryVectorStore.from_texts(texts, emb)    store = MSAVectorStore.from_texts(texts, engine=engine)
    retriever = store.as_retriever(search_kwargs={"k": 3}) retriever = store.as_retriever(search_kwargs={"k": 3})
    llm = ChatOpenAI(...)                                 llm = ChatMSA(engine=engine)   # answers from memory

- `ChatMSA`: a chat model answering from the engine's memory (the last human message is the question, earlier
  turns the history, system messages the system prompt). `response_metadata["documents"]` lists the routed
  documents; `usage_metadata` and `response_metadata["timings"]` are always set. No tool calling.
- `MSARetriever` / `MSAVectorStore`: the model's router ranks documents (no embeddings).
- `MSAStore`: a LangGraph `BaseStore` whose items live in the engine's memory; namespaces are separate scopes.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from pydantic import ConfigDict, Field

from ..core import check_text

__all__ = ["ChatMSA", "MSARetriever", "MSAVectorStore", "MSAStore", "filter_to_allow_ids"]

_OPS = {
    "$eq": lambda a, b: a == b, "$ne": lambda a, b: a != b, "$gt": lambda a, b: a > b, "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b, "$lte": lambda a, b: a <= b, "$in": lambda a, b: a in b, "$nin": lambda a, b: a not in b,
}


# ---------------------------------------------------------------------------------------------- filters
def _match(meta: dict, flt: dict) -> bool:
    for key, cond in flt.items():
        if key == "$and":
            if not all(_match(meta, f) for f in cond):
                return False
            continue
        if key == "$or":
            if not any(_match(meta, f) for f in cond):
                return False
            continue
        value = meta.get(key)
        if isinstance(cond, dict) and cond and all(isinstance(k, str) and k.startswith("$") for k in cond):
            for op, arg in cond.items():
                if value is None and op not in ("$ne", "$nin"):
                    return False
                try:
                    if not _OPS[op](value, arg):
                        return False
                except TypeError as e:
                    raise ValueError(f"filter {key!r} {op} {arg!r} cannot be compared with metadata value "
                                     f"{value!r}: {e}") from e
        elif value != cond:
            return False
    return True


def _check_filter(flt) -> None:
    if flt is None or callable(flt):
        return
    if not isinstance(flt, dict):
        raise ValueError(f"filter must be a dict of metadata key -> value (or a callable on Document), "
                         f"got {type(flt).__name__}")
    for key, cond in flt.items():
        if not isinstance(key, str):
            raise ValueError(f"filter keys must be metadata field names (str), got {key!r}")
        if key in ("$and", "$or"):
            if not isinstance(cond, list):
                raise ValueError(f"{key} takes a list of filters")
            for f in cond:
                _check_filter(f)
        elif isinstance(cond, dict) and cond and all(isinstance(k, str) and k.startswith("$") for k in cond):
            bad = [k for k in cond if k not in _OPS]
            if bad:
                raise ValueError(f"unknown filter operator(s) {bad}; use one of {sorted(_OPS)}")


def filter_to_allow_ids(state, flt) -> Optional[list]:
    """A LangChain-style metadata filter (dict with optional $eq/$ne/$gt/$gte/$lt/$lte/$in/$nin/$and/$or, or a
    callable taking a Document) -> ids of the matching memory documents, applied before routing."""
    if flt is None:
        return None
    _check_filter(flt)
    out = []
    for i in range(len(state)):
        meta = state.metadata[i]
        ok = flt(Document(page_content=state.texts[i], metadata=dict(meta), id=state.ids[i])) if callable(flt) \
            else _match(meta, flt)
        if ok:
            out.append(state.ids[i])
    return out


def _check_query(query) -> str:
    return check_text(query, "query")


def _route_docs(engine, query: str, k: int, flt) -> list:
    """[(Document, score)] in routing order; [] on an empty memory or a filter that matches nothing."""
    query = _check_query(query)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    state = engine.memory.state
    allow = filter_to_allow_ids(state, flt)
    if len(state) == 0 or (allow is not None and not allow):
        return []
    routing = engine.route(query, k=k, allow_ids=allow, state=state)
    return [(Document(page_content=state.texts[r], metadata=dict(state.metadata[r]), id=state.ids[r]), float(s))
            for r, s in zip(routing.rows, routing.scores)]


# ---------------------------------------------------------------------------------------------- chat model
def _text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append(block.get("text", ""))
            elif isinstance(block, dict) and block.get("type") in ("reasoning", "thinking"):
                continue
            else:
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise ValueError(f"message {i} has a {kind!r} content block; ChatMSA takes text only")
        return "".join(parts)
    raise TypeError(f"message {i} content must be a str or a list of text blocks, got {type(content).__name__}")


def _split_messages(messages: Sequence[BaseMessage]):
    """-> (question, history [{role, content}], system or None). The question is the last human message."""
    if not messages:
        raise ValueError("no messages to answer")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, BaseMessage):
            raise TypeError(f"message {i} is a {type(m).__name__}, not a langchain BaseMessage")
        text = _text(m.content, i)
        if m.type == "system":
            system.append(text)
        elif m.type == "human":
            turns.append({"role": "user", "content": text})
        elif m.type == "ai":
            turns.append({"role": "assistant", "content": text})
        elif m.type == "tool":
            turns.append({"role": "user", "content": f"Tool result: {text}"})
        else:
            turns.append({"role": "user", "content": text})
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("ChatMSA needs a human message to answer")
    question = turns[last_user]["content"]
    history = turns[:last_user] + turns[last_user + 1:]
    return question, history, ("\n\n".join(system) if system else None)


class ChatMSA(BaseChatModel):
    """Chat model that answers from the `MSAEngine`'s memory (routing + generation in one call)."""

    engine: Any = Field(exclude=True, description="the MSAEngine")
    model_name: Optional[str] = Field(default=None, alias="model")
    mode: Optional[str] = None
    k: Optional[int] = None
    max_tokens: Optional[int] = Field(default=None, alias="max_new_tokens")
    temperature: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[List[str]] = Field(default=None, alias="stop_sequences")
    filter: Any = None
    use_memory: bool = True  # False: the model alone (engine.generate), no routing
    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    @property
    def _llm_type(self) -> str:
        return "msa"

    @property
    def _identifying_params(self) -> dict:
        return {"model_name": self._name(), "mode": self.mode, "k": self.k, "max_tokens": self.max_tokens,
                "temperature": self.temperature}

    def _name(self) -> str:
        return self.model_name or getattr(self.engine, "name", "msa")

    def _get_ls_params(self, stop=None, **kwargs):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "msa"
        params["ls_model_name"] = kwargs.get("model") or self._name()
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _run(self, messages, stop, kwargs):
        """-> (piece iterator, finish() -> (text, metadata, usage)). Stop sequences cut the text (the engine
        generates to the end of the piece that crossed a stop sequence)."""
        question, history, system = _split_messages(messages)
        if kwargs.get("model") not in (None, self._name()):
            raise ValueError(f"ChatMSA runs the engine's loaded model {self._name()!r}; it cannot switch to "
                             f"{kwargs['model']!r} per call (make another engine)")
        stop = stop or kwargs.get("stop") or self.stop
        max_new = kwargs.get("max_tokens", self.max_tokens)
        temp = kwargs.get("temperature", self.temperature)
        seed = kwargs.get("seed", self.seed)
        engine = self.engine
        if self.use_memory:
            flt = kwargs.get("filter", self.filter)
            allow = filter_to_allow_ids(engine.memory.state, flt)
            if allow is not None and not allow:
                raise ValueError(f"no memory document matches the filter {flt!r}")
            stream = engine.stream(_check_query(question), mode=kwargs.get("mode", self.mode),
                                   k=kwargs.get("k", self.k), max_new_tokens=max_new, temperature=temp,
                                   allow_ids=allow, history=history or None, system=system, seed=seed,
                                   stop=stop or None)
            docs = stream.documents
            pieces = iter(stream)

            def finish():
                r = stream.result
                return r.timings, r.prompt_tokens, r.completion_tokens, r.finish_reason, r.mode
        else:
            from ..engine.generation import GenerationStats
            import time
            msgs = ([{"role": "system", "content": system}] if system else []) + history + \
                [{"role": "user", "content": _check_query(question)}]
            stats = GenerationStats()
            t0 = time.perf_counter()
            docs = []
            pieces = engine.stream_generate(msgs, max_new_tokens=max_new, temperature=temp, seed=seed, stats=stats,
                                            stop=stop or None)

            def finish():
                timings = {"routing_s": 0.0, "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
                           "first_token_s": stats.first_token_s, "total_s": time.perf_counter() - t0}
                return timings, stats.prompt_tokens, stats.completion_tokens, stats.finish_reason, "generate"

        meta_docs = [{"id": d.id, "score": d.score, "round": d.round, "rank": d.rank, "metadata": d.metadata,
                      "text": d.text} for d in docs]

        def gen():  # the engine cuts at stop sequences and ends generation there
            yield from pieces
            timings, p_tok, c_tok, finish_reason, mode = finish()
            gen.meta = {"model_name": self._name(), "model_provider": "msa",
                        "finish_reason": finish_reason, "timings": timings,
                        "mode": mode, "documents": meta_docs}
            gen.usage = {"input_tokens": p_tok, "output_tokens": c_tok, "total_tokens": p_tok + c_tok}

        return gen

    def _generate(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        gen = self._run(messages, stop, kwargs)
        text = "".join(gen())
        msg = AIMessage(content=text, response_metadata=gen.meta, usage_metadata=gen.usage)
        return ChatResult(generations=[ChatGeneration(message=msg)], llm_output={"model_name": self._name()})

    def _stream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        gen = self._run(messages, stop, kwargs)
        for piece in gen():
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=gen.meta,
                                                         usage_metadata=gen.usage, chunk_position="last"))

    # async: BaseChatModel runs _generate / _stream in a thread executor, so the event loop never blocks


# ---------------------------------------------------------------------------------------------- retriever
class MSARetriever(BaseRetriever):
    """Routed documents (routing order); each carries `metadata["routing_score"]`."""

    engine: Any = Field(exclude=True)
    k: int = 4
    filter: Any = None
    model_config = ConfigDict(arbitrary_types_allowed=True)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: Optional[int] = None, filter: Any = None, **kwargs: Any) -> List[Document]:
        pairs = _route_docs(self.engine, query, k or self.k, filter if filter is not None else self.filter)
        out = []
        for doc, score in pairs:
            doc.metadata["routing_score"] = score
            out.append(doc)
        return out


# ---------------------------------------------------------------------------------------------- vector store
class MSAVectorStore(VectorStore):
    """A VectorStore stand-in over the engine's memory: the model's router ranks, no embeddings are used.

    Adding an id that exists replaces that document (upsert, as LangChain vector stores do); deleting ids that
    are not there is a no-op (as the VectorStore contract says); `get_by_ids` skips missing ids."""

    def __init__(self, engine, embedding=None, k: int = 4):
        self.engine = engine
        self.k = k
        self._lock = threading.RLock()
        if embedding is not None:
            import warnings
            warnings.warn("MSAVectorStore ignores `embedding`: the model's router ranks documents")

    @property
    def embeddings(self):
        return None

    def add_texts(self, texts: Iterable[str], metadatas: Optional[List[dict]] = None, *,
                  ids: Optional[List[str]] = None, **kwargs: Any) -> List[str]:
        texts = list(texts)
        if ids is None:
            ids = [uuid.uuid4().hex for _ in texts]
        ids = [i if i is not None else uuid.uuid4().hex for i in ids]
        if len(ids) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(ids)} ids")
        metas = [dict(m or {}) for m in (metadatas or [{} for _ in texts])]
        with self._lock:  # an existing id is replaced in one step (readers never miss it)
            return self.engine.replace(texts, ids=ids, metadata=metas, progress=False)

    def delete(self, ids: Optional[List[str]] = None, **kwargs: Any) -> Optional[bool]:
        if ids is None:
            raise ValueError("pass the ids to delete")
        if isinstance(ids, str):
            ids = [ids]
        with self._lock:
            present = [i for i in ids if i in self.engine.memory]
            if present:
                self.engine.delete(present)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> List[Document]:
        out = []
        for i in ids:  # unknown ids are skipped, as VectorStore.get_by_ids specifies
            if i not in self.engine.memory:
                continue
            parts = self.engine.get([i])  # a long text stored in parts comes back whole
            meta = {k: v for k, v in parts[0].metadata.items() if k not in ("parent_id", "part")} \
                if len(parts) > 1 else dict(parts[0].metadata)
            out.append(Document(page_content="".join(p.text for p in parts), metadata=meta, id=i))
        return out

    def similarity_search_with_score(self, query: str, k: int = 4, filter: Any = None,
                                     **kwargs: Any) -> List[tuple]:
        return _route_docs(self.engine, query, k, filter)

    def similarity_search(self, query: str, k: int = 4, filter: Any = None, **kwargs: Any) -> List[Document]:
        return [d for d, _ in self.similarity_search_with_score(query, k=k, filter=filter)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda s: (s + 1.0) / 2.0  # cosine routing scores in [-1, 1] -> [0, 1]

    @classmethod
    def from_texts(cls, texts: List[str], embedding=None, metadatas: Optional[List[dict]] = None, *,
                   ids: Optional[List[str]] = None, engine=None, **kwargs: Any) -> "MSAVectorStore":
        if engine is None:
            raise ValueError("MSAVectorStore.from_texts needs engine=MSAEngine.from_pretrained(...)")
        store = cls(engine, embedding=embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    @classmethod
    def from_documents(cls, documents: List[Document], embedding=None, **kwargs: Any) -> "MSAVectorStore":
        ids = kwargs.pop("ids", None) or ([d.id for d in documents] if any(d.id for d in documents) else None)
        return cls.from_texts([d.page_content for d in documents], embedding,
                              [d.metadata for d in documents], ids=ids, **kwargs)


# ---------------------------------------------------------------------------------------------- LangGraph store
from langgraph.store.base import (BaseStore, GetOp, Item, ListNamespacesOp, PutOp, SearchItem,  # noqa: E402
                                  SearchOp)

_MARK = "msa_store"


def _doc_id(namespace: tuple, key: str) -> str:
    return json.dumps([list(namespace), key], ensure_ascii=False)


class MSAStore(BaseStore):
    """LangGraph long-term memory store in an MSAEngine's memory bank.

    Each item is one memory document (id = [namespace, key]); its value, timestamps and namespace live in the
    document's metadata, so `engine.save` / `engine.load` persist the store. Namespaces are separate scopes:
    a search routes only over documents under its namespace prefix (allow-list before routing). The routed
    text of an item is `value[text_field]` when that is a str (default "text"), else the value as JSON."""

    supports_ttl = False

    def __init__(self, engine, text_field: str = "text"):
        self.engine = engine
        self.text_field = text_field
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ helpers
    def _items(self, state):
        for i in range(len(state)):
            m = state.metadata[i]
            if m.get(_MARK):
                yield i, m

    @staticmethod
    def _item(m, cls=Item, **extra):
        return cls(value=m["value"], key=m["key"], namespace=tuple(m["namespace"]),
                   created_at=datetime.fromisoformat(m["created_at"]),
                   updated_at=datetime.fromisoformat(m["updated_at"]), **extra)

    def _text(self, value: dict) -> str:
        t = value.get(self.text_field)
        return t if isinstance(t, str) and t.strip() else json.dumps(value, ensure_ascii=False, sort_keys=True)

    # ------------------------------------------------------------------ ops
    def _get(self, op: GetOp, state):
        row = state.row_of.get(_doc_id(op.namespace, op.key))
        if row is None or not state.metadata[row].get(_MARK):
            return None
        return self._item(state.metadata[row])

    def _put(self, op: PutOp) -> None:
        if not isinstance(op.key, str) or not op.key:
            raise ValueError(f"keys must be non-empty str, got {op.key!r}")
        doc_id = _doc_id(op.namespace, op.key)
        with self._lock:
            state = self.engine.memory.state
            row = state.row_of.get(doc_id)
            if op.value is None:
                if row is not None:
                    self.engine.delete([doc_id])
                return
            if not isinstance(op.value, dict):
                raise TypeError(f"store values must be dicts, got {type(op.value).__name__}")
            now = datetime.now(timezone.utc).isoformat()
            created = state.metadata[row]["created_at"] if row is not None else now
            meta = {_MARK: True, "namespace": list(op.namespace), "key": op.key, "value": op.value,
                    "created_at": created, "updated_at": now}
            self.engine.replace([self._text(op.value)], ids=[doc_id], metadata=[meta], progress=False)

    def _search(self, op: SearchOp, state):
        prefix = tuple(op.namespace_prefix)
        flt = op.filter or None
        if flt is not None:
            _check_filter(flt)
        rows = [i for i, m in self._items(state) if tuple(m["namespace"])[:len(prefix)] == prefix
                and (flt is None or _match(m["value"], flt))]
        if not rows:
            return []
        if op.query:
            routing = self.engine.route(_check_query(op.query), k=op.offset + op.limit,
                                        allow_ids=[state.ids[i] for i in rows], state=state)
            hits = list(zip(routing.rows, routing.scores))[op.offset:op.offset + op.limit]
            return [self._item(state.metadata[r], SearchItem, score=float(s)) for r, s in hits]
        rows.sort(key=lambda i: state.metadata[i]["updated_at"], reverse=True)
        return [self._item(state.metadata[i], SearchItem) for i in rows[op.offset:op.offset + op.limit]]

    def _list(self, op: ListNamespacesOp, state):
        spaces = sorted({tuple(m["namespace"]) for _, m in self._items(state)})
        for cond in op.match_conditions or ():
            path = tuple(cond.path)

            def ok(ns):
                if len(ns) < len(path):
                    return False
                part = ns[:len(path)] if cond.match_type == "prefix" else ns[len(ns) - len(path):]
                return all(p == "*" or p == n for p, n in zip(path, part))
            spaces = [ns for ns in spaces if ok(ns)]
        if op.max_depth is not None:
            spaces = sorted({ns[:op.max_depth] for ns in spaces})
        return spaces[op.offset:op.offset + op.limit]

    def batch(self, ops: Iterable) -> list:
        results = []
        for op in ops:
            if isinstance(op, PutOp):
                self._put(op)
                results.append(None)
                continue
            state = self.engine.memory.state
            if isinstance(op, GetOp):
                results.append(self._get(op, state))
            elif isinstance(op, SearchOp):
                results.append(self._search(op, state))
            elif isinstance(op, ListNamespacesOp):
                results.append(self._list(op, state))
            else:
                raise TypeError(f"unknown store operation {type(op).__name__}")
        return results

    async def abatch(self, ops: Iterable) -> list:
        import asyncio
        return await asyncio.to_thread(self.batch, list(ops))
