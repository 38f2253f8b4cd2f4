"""`ChatMSA`: a LangChain chat model that answers from an `MSAEngine`'s memory (routing + generation in one
call), or, with `use_memory=False`, is the engine's model alone."""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, List, Optional, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from msa_plugins import AnswerOptions, InvalidArgumentError, InvalidTypeError, QueryResult, Stream
from msa_plugins.validation import check_text

from .._aio import aiter_in_thread
from .filters import filter_to_predicate


# ---------------------------------------------------------------------------------------------- messages
def _text(content, i: int) -> str:
    """A message's text: a str, or the text blocks of a content list (reasoning blocks are dropped)."""
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
                raise InvalidArgumentError(f"message {i} has a {kind!r} content block; ChatMSA takes text only")
        return "".join(parts)
    raise InvalidTypeError(f"message {i} content must be a str or a list of text blocks, got {type(content).__name__}")


def _split_messages(messages: Sequence[BaseMessage]):
    """-> (question, history [{role, content}], system or None). The question is the last user turn (a human
    message, or a tool result); the other turns are the history, system messages (joined) the system prompt."""
    if not messages:
        raise InvalidArgumentError("no messages to answer")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, BaseMessage):
            raise InvalidTypeError(f"message {i} is a {type(m).__name__}, not a langchain BaseMessage")
        text = _text(m.content, i)
        if m.type == "system":
            system.append(text)
        elif m.type == "ai":
            turns.append({"role": "assistant", "content": text})
        elif m.type == "tool":  # the engine's chat roles are system/user/assistant
            turns.append({"role": "user", "content": f"Tool result: {text}"})
        else:
            turns.append({"role": "user", "content": text})
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last_user is None:
        raise InvalidArgumentError("ChatMSA needs a human message to answer")
    question = check_text(turns[last_user]["content"], "question")
    history = turns[:last_user] + turns[last_user + 1:]
    return question, history, ("\n\n".join(system) if system else None)


def _document_metadata(stream: Stream) -> list:
    return [{"id": d.id, "score": d.score, "round": d.round, "rank": d.rank, "metadata": d.metadata, "text": d.text}
            for d in stream.documents]


# ---------------------------------------------------------------------------------------------- chat model
class ChatMSA(BaseChatModel):
    """Chat model that answers from the `MSAEngine`'s memory (routing + generation in one call).

    The last human message is the question, earlier turns the history, system messages the system prompt.
    `response_metadata["documents"]` lists the routed documents (id, score, round, rank, metadata, text);
    `usage_metadata` and `response_metadata["timings"]` are always set. No tool calling.

    Setup:
        engine = MSAEngine.from_pretrained(); engine.add(texts, ids=ids, metadata=metas)
    Instantiate:
        llm = ChatMSA(engine=engine, k=3, max_tokens=128, filter={"topic": "geo"})
        llm = ChatMSA(engine=engine, use_memory=False)     # the model alone, e.g. inside a retriever chain
    Invoke / stream / async:
        llm.invoke("question"); llm.stream(...); await llm.ainvoke(...); llm.astream(...)
        per call: k, mode, max_tokens, temperature, seed, stop, filter
    """

    engine: Any = Field(exclude=True, description="the MSAEngine")
    model_name: Optional[str] = Field(default=None, alias="model", description="defaults to the engine's model")
    mode: Optional[str] = Field(default=None, description="interleave, sparse or protocol (None: the engine's)")
    k: Optional[int] = Field(default=None, description="documents routed per question (None: the engine's)")
    max_tokens: Optional[int] = Field(default=None, alias="max_new_tokens")
    temperature: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[List[str]] = Field(default=None, alias="stop_sequences")
    filter: Any = Field(default=None, description="metadata filter (dict, or a callable taking a Document)")
    use_memory: bool = Field(default=True, description="False: the model alone (no routing)")
    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    @property
    def _llm_type(self) -> str:
        return "msa"

    @property
    def _identifying_params(self) -> dict:
        return {"model_name": self._name(), "mode": self.mode, "k": self.k, "max_tokens": self.max_tokens,
                "temperature": self.temperature}

    def _name(self) -> str:
        return self.model_name or self.engine.model_name

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

    def _options(self, stop: Optional[List[str]], kwargs: dict) -> AnswerOptions:
        """This call's options: per-call kwargs over this model's fields over the engine's defaults (None keeps
        the next one), in LangChain's names. The one place they are mapped, and validated."""
        return self.engine.answer_defaults.merged(
            mode=kwargs.get("mode", self.mode), k=kwargs.get("k", self.k),
            max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
            temperature=kwargs.get("temperature", self.temperature), seed=kwargs.get("seed", self.seed),
            stop=stop or kwargs.get("stop") or self.stop)

    def _run(self, messages: List[BaseMessage], stop: Optional[List[str]], kwargs: dict) -> Stream:
        """Start answering: the engine's `Stream` (documents known now; pieces; result at the end). The engine
        cuts the text at stop sequences and ends generation there."""
        question, history, system = _split_messages(messages)
        if kwargs.get("model") not in (None, self._name()):
            raise InvalidArgumentError(f"ChatMSA runs the engine's loaded model {self._name()!r}; it cannot switch "
                                       f"to {kwargs['model']!r} per call (make another engine)")
        options = self._options(stop, kwargs)
        engine = self.engine
        if not self.use_memory:
            turns = ([{"role": "system", "content": system}] if system else []) + history + \
                [{"role": "user", "content": question}]
            return engine.stream_generate(turns, options)
        flt = kwargs.get("filter", self.filter)
        where = filter_to_predicate(flt)
        snap = engine.snapshot()
        if where is not None:
            where = snap.select(where)
            if not where:  # a filter that admits nothing is a mistake here: there is nothing to answer from
                raise InvalidArgumentError(f"no memory document matches the filter {flt!r}; check the metadata "
                                           "names and values, or drop the filter")
        return engine.stream(question, options, where=where, history=history or None, snapshot=snap, system=system)

    def _result_metadata(self, stream: Stream):
        """-> (response_metadata, usage_metadata) of a finished stream."""
        r = stream.result
        timings = dict(r.timings)
        timings.setdefault("routing_s", 0.0)  # plain generation routes nothing: same keys either way
        meta = {"model_name": self._name(), "model_provider": "msa", "finish_reason": r.finish_reason,
                "timings": timings, "mode": r.mode if isinstance(r, QueryResult) else "generate",
                "documents": _document_metadata(stream)}
        usage = {"input_tokens": r.prompt_tokens, "output_tokens": r.completion_tokens,
                 "total_tokens": r.prompt_tokens + r.completion_tokens}
        return meta, usage

    def _chunks(self, stream: Stream) -> Iterator[ChatGenerationChunk]:
        """One chunk per piece, then an empty last chunk with the metadata and usage."""
        try:
            for piece in stream:
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        finally:  # also when the consumer stops early: the engine stops generating
            stream.close()
        meta, usage = self._result_metadata(stream)
        yield ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=meta, usage_metadata=usage,
                                                         chunk_position="last"))

    def _generate(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        stream = self._run(messages, stop, kwargs)
        text = "".join(stream)
        meta, usage = self._result_metadata(stream)
        msg = AIMessage(content=text, response_metadata=meta, usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=msg)], llm_output={"model_name": self._name()})

    def _stream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(self._run(messages, stop, kwargs)):
            if run_manager and chunk.message.chunk_position != "last":
                run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    async def _astream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        # routing, prefill and every decode step run in a worker thread; callbacks run on the event loop
        async for chunk in aiter_in_thread(lambda: self._chunks(self._run(messages, stop, kwargs))):
            if run_manager and chunk.message.chunk_position != "last":
                await run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    # _agenerate: BaseChatModel runs _generate in an executor thread, so the event loop never blocks


__all__ = ["ChatMSA"]
