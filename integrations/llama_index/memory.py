"""`MSAMemoryBlock`: long-term agent memory for `llama_index.core.memory.Memory(memory_blocks=[...])`."""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.memory.memory import BaseMemoryBlock
from pydantic import Field, PrivateAttr

from msa_plugins import InvalidTypeError, MemoryDocument, MSAEngine

from .._fields import refuse_unknown, unknown_fields
from ._collections import MEMORY_BLOCK_COLLECTION, check_collection

SCOPE_KEY = "msa_memory_scope"  # metadata key that keeps blocks with different scopes apart
# LlamaIndex's `Memory` tags each flushed message with its session (`additional_kwargs["session_id"]`) and asks
# every block with `session_id=`; `VectorMemoryBlock` keeps sessions apart by this metadata key, and so do we
SESSION_KEY = "session_id"

__all__ = ["MSAMemoryBlock"]

# VectorMemoryBlock's knobs (a port from it passes them) and what MSAMemoryBlock does instead; any other unknown
# argument is refused too
_NO_VECTORS = "MSAMemoryBlock keeps its memories in the engine's memory and routes with the model: no vector store " \
              "or embedding model"
_INIT_HINTS = {
    "similarity_top_k": "MSAMemoryBlock's number of memories recalled is `k=`",
    "vector_store": _NO_VECTORS, "embed_model": _NO_VECTORS,
    "retrieval_context_window": "MSAMemoryBlock routes on the latest user message only",
    "query_kwargs": "MSAMemoryBlock takes no query kwargs or filters: `scope=` (and the Memory's session_id) keep "
                    "memories apart",
    "format_template": "MSAMemoryBlock returns the recalled messages one per line; format them in your prompt",
    "node_postprocessors": "MSAMemoryBlock returns the routed memories as they are; it runs no node postprocessors",
    "collection": "MSAMemoryBlock's collection is `collection_name=`"}


class MSAMemoryBlock(BaseMemoryBlock[str]):
    """Chat turns flushed out of short-term memory go into the engine's memory (one document per message,
    tagged with `scope`); `aget` returns the memories routed for the latest user message, as text.

    The memories live in their own collection (`collection_name`, default "llama_index_memory"), so they
    never surface in document search, a query engine or `ChatMSA` routing over another collection; within
    it, `scope` keeps users apart (filtered before routing), and so does the `Memory`'s `session_id`, as in
    LlamaIndex's own `VectorMemoryBlock`: a memory put under one session is recalled only under that session
    (memories put with no session are recalled only when asked with none).

        block = MSAMemoryBlock(name="long_term", engine=engine, scope="user-1", k=3)
        memory = Memory.from_defaults(session_id="s1", memory_blocks=[block])
    """

    scope: str = Field(default="default", description="memory scope; blocks with different scopes never mix")
    k: int = Field(default=3, ge=1, description="memories recalled per user message")
    collection_name: str = Field(default=MEMORY_BLOCK_COLLECTION, description="the engine collection of the memories")
    accept_short_term_memory: bool = Field(default=True)
    _engine: Any = PrivateAttr()

    def __init__(self, engine: MSAEngine, **kwargs: Any):
        if engine is None:
            raise InvalidTypeError("MSAMemoryBlock needs engine=MSAEngine.from_pretrained(...)")
        refuse_unknown(unknown_fields(type(self), kwargs), "MSAMemoryBlock()", _INIT_HINTS)
        super().__init__(**kwargs)
        check_collection(self.collection_name)
        self._engine = engine

    @property
    def engine(self) -> MSAEngine:
        return self._engine

    def _in_scope(self, doc: MemoryDocument, session_id: Optional[str] = None) -> bool:
        return doc.metadata.get(SCOPE_KEY) == self.scope and (session_id is None
                                                              or doc.metadata.get(SESSION_KEY) == session_id)

    def _get_sync(self, messages: Optional[List[ChatMessage]], session_id: Optional[str] = None) -> str:
        question = next((m.content for m in reversed(messages or [])
                         if m.role == MessageRole.USER and isinstance(m.content, str) and m.content.strip()), None)
        if question is None:
            return ""
        docs = self._engine.retrieve(question, k=self.k, where=lambda d: self._in_scope(d, session_id),
                                     collection=self.collection_name)
        return "\n".join(d.text for d in docs)

    async def _aget(self, messages: Optional[List[ChatMessage]] = None, **block_kwargs: Any) -> str:
        # `Memory.aget` passes its session_id and the caller's block_kwargs to every block; like LlamaIndex's
        # own blocks, this one reads session_id and leaves kwargs meant for other blocks alone
        return await asyncio.to_thread(self._get_sync, messages, block_kwargs.get("session_id"))

    def _put_sync(self, messages: List[ChatMessage]) -> None:
        texts, metadata = [], []
        for m in messages:
            if not isinstance(m.content, str) or not m.content.strip():
                continue  # tool calls and images carry no text to remember
            role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
            texts.append(f"{role}: {m.content}")
            meta = {SCOPE_KEY: self.scope, "role": role}
            session_id = (m.additional_kwargs or {}).get(SESSION_KEY)  # set by BaseMemoryBlock.aput(session_id=)
            if session_id is not None:
                meta[SESSION_KEY] = session_id
            metadata.append(meta)
        if texts:
            self._engine.add(texts, metadata=metadata, progress=False,
                             collection=self.collection_name)

    async def _aput(self, messages: List[ChatMessage]) -> None:
        await asyncio.to_thread(self._put_sync, messages)
