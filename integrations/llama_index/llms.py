"""`MSALLM`: the engine's model as a plain LlamaIndex LLM (no memory), shaped like `llama-index-llms-ollama`:
chat and stream_chat are implemented once (sync and async); complete and stream_complete are derived from
them with LlamaIndex's own decorators."""

from __future__ import annotations

import asyncio
from typing import Any, Optional, Sequence

from llama_index.core.base.llms.generic_utils import (achat_to_completion_decorator,
                                                      astream_chat_to_completion_decorator,
                                                      chat_to_completion_decorator,
                                                      stream_chat_to_completion_decorator)
from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen,
                                              CompletionResponse, CompletionResponseAsyncGen,
                                              CompletionResponseGen, LLMMetadata, MessageRole)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import Field, PrivateAttr

from msa_plugins import AnswerOptions, GenerationResult, InvalidTypeError, MSAEngine
from msa_plugins.validation import check_text

from .._aio import aiter_in_thread

__all__ = ["MSALLM"]


class MSALLM(CustomLLM):
    """The engine's model as a LlamaIndex LLM: complete/chat, streaming, and async (generation runs in a
    worker thread, so the event loop keeps running).

    `raw` of each response (of the last chunk when streaming) holds `timings`, `usage` and
    `finish_reason`. Per call, `max_new_tokens`, `temperature`, `stop` and `seed` override the fields.

        llm = MSALLM(engine=engine, max_new_tokens=64)
        llm.complete("Where is Paris?").text
    """

    max_new_tokens: Optional[int] = Field(default=None, description="tokens to generate; None: the engine's default")
    temperature: Optional[float] = Field(default=None, description="0 is greedy; None: the engine's default")
    seed: Optional[int] = Field(default=None, description="sampling seed (temperature > 0)")
    _engine: Any = PrivateAttr()  # an MSAEngine (or anything with its generate/stream_generate)

    def __init__(self, engine: MSAEngine, **kwargs: Any):
        if engine is None:
            raise InvalidTypeError("MSALLM needs engine=MSAEngine.from_pretrained(...)")
        super().__init__(**kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "MSALLM"

    @property
    def engine(self) -> MSAEngine:
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self._engine.context_window, num_output=self._options({}).max_new_tokens,
                           is_chat_model=True, is_function_calling_model=False, model_name=self._engine.model_name)

    def _options(self, kwargs: dict) -> AnswerOptions:
        """This LLM's fields and one call's kwargs -> the engine's options (None keeps the engine's default)."""
        return self._engine.answer_defaults.merged(
            max_new_tokens=kwargs.get("max_new_tokens", self.max_new_tokens),
            temperature=kwargs.get("temperature", self.temperature), stop=kwargs.get("stop"),
            seed=kwargs.get("seed", self.seed))

    # ------------------------------------------------------------------ chat (implemented once)
    # The public methods carry LlamaIndex's callback decorators; the async ones run the undecorated sync
    # bodies in a worker thread, so each call emits its LLM events once.
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self._chat, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        chunks = await asyncio.to_thread(self._stream_chat, messages, kwargs)  # bad input raises here
        return aiter_in_thread(lambda: chunks)

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict) -> ChatResponse:
        result = self._engine.generate(_to_engine_messages(messages), self._options(kwargs))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text), raw=_raw(result))

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict) -> ChatResponseGen:
        stream = self._engine.stream_generate(_to_engine_messages(messages), self._options(kwargs))

        def gen() -> ChatResponseGen:
            text = ""
            try:
                for piece in stream:
                    text += piece
                    yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)
            finally:  # also when the caller stops early: the stream records what was generated
                stream.close()
            # the last chunk carries the result (LlamaIndex reads usage from the final response)
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta="",
                               raw=_raw(stream.result))

        return gen()

    # ------------------------------------------------------------------ completion (derived from chat)
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return chat_to_completion_decorator(self.chat)(check_text(prompt, "prompt"), **kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return stream_chat_to_completion_decorator(self.stream_chat)(check_text(prompt, "prompt"), **kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await achat_to_completion_decorator(self.achat)(check_text(prompt, "prompt"), **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        return await astream_chat_to_completion_decorator(self.astream_chat)(check_text(prompt, "prompt"), **kwargs)


def _to_engine_messages(messages: Sequence[ChatMessage]) -> list:
    """LlamaIndex chat messages -> the engine's [{"role", "content"}] (its chat template renders them)."""
    out = []
    for m in messages:
        content = m.content if m.content is not None else ""
        if not isinstance(content, str):
            raise InvalidTypeError(f"message content must be text, got {type(content).__name__}")
        role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
        if role not in ("system", "user", "assistant"):
            # "model" / "chatbot" are the assistant under other names; tool and function results reach
            # a model without tool calling as text the user supplied
            role = "assistant" if role in ("model", "chatbot") else "user"
        out.append({"role": role, "content": content})
    return out


def _raw(result: GenerationResult) -> dict:
    return {"timings": dict(result.timings), "usage": result.usage, "finish_reason": result.finish_reason}
