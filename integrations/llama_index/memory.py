"""`MSAMemoryBlock`: long-term agent memory for `llama_index.core.memory.Memory(memory_blocks=[...])`."""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.memory.memory import BaseMemoryBlock
from pydantic import Field, PrivateAttr

from msa_plugins import InvalidTypeError, MemoryDocument, MSAEngine

from ._collections import MEMORY_BLOCK_COLLECTION, check_collection

SCOPE_KEY = "msa_memory_scope"  # metadata key that keeps blocks with different scopes apart

__all__ = ["MSAMemoryBlock"]


class MSAMemoryBlock(BaseMemoryBlock[str]):
    """Chat turns flushed out of short-term memory go into the engine's memory (one document per message,
    tagged with `scope`); `aget` returns the memories routed for the latest user message, as text.

    The memories live in their own collection (`collection_name`, default "llama_index_memory"), so they
    never surface in document search, a query engine or `ChatMSA` routing over another collection; within
    it, `scope` keeps users apart (filtered before routing).

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
        super().__init__(**kwargs)
        check_collection(self.collection_name)
        self._engine = engine

    @property
    def engine(self) -> MSAEngine:
        return self._engine

    def _in_scope(self, doc: MemoryDocument) -> bool:
        return doc.metadata.get(SCOPE_KEY) == self.scope

    def _get_sync(self, messages: Optional[List[ChatMessage]]) -> str:
        question = next((m.content for m in reversed(messages or [])
                         if m.role == MessageRole.USER and isinstance(m.content, str) and m.content.strip()), None)
        if question is None:
            return ""
        return "\n".join(d.text for d in self._engine.retrieve(question, k=self.k, where=self._in_scope,
                                                             collection=self.collection_name))

    async def _aget(self, messages: Optional[List[ChatMessage]] = None, **block_kwargs: Any) -> str:
        return await asyncio.to_thread(self._get_sync, messages)

    def _put_sync(self, messages: List[ChatMessage]) -> None:
        texts, metadata = [], []
        for m in messages:
            if not isinstance(m.content, str) or not m.content.strip():
                continue  # tool calls and images carry no text to remember
            role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
            texts.append(f"{role}: {m.content}")
            metadata.append({SCOPE_KEY: self.scope, "role": role})
        if texts:
            self._engine.add(texts, metadata=metadata, progress=False,
                             collection=self.collection_name)

    async def _aput(self, messages: List[ChatMessage]) -> None:
        await asyncio.to_thread(self._put_sync, messages)
