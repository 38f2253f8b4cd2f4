"""`ChatMSA`: a LangChain chat model that answers from an `MSAEngine`'s memory (routing + generation in one
call), or, with `use_memory=False`, is the engine's model alone."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, AsyncIterator, Iterator, List, Literal, Optional, Sequence, Union

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, field_validator, model_validator

from msa_plugins import AnswerOptions, CallTimeoutError, InvalidArgumentError, InvalidTypeError, QueryResult
from msa_plugins.validation import check_int, check_text

from .._aio import aiter_in_thread
from .._fields import check_engine, refuse_unknown, unknown_fields
from ._collections import ALL_COLLECTIONS, DEFAULT_COLLECTION, check_collection, collection_kwargs
from .filters import filter_to_predicate
from .tools import (check_tool_choice, check_tools, looks_like_call, parse_tool_calls, protocol_prompt, schema_prompt,
                    template_call_text, template_choice_prompt, template_result_text)

logger = logging.getLogger(__name__)

_MIN_QUOTE = 20  # characters: a memory document this long, quoted verbatim in the prompt, means "already stuffed"
# per-call keyword arguments ChatMSA reads (LangChain's names); anything else is refused, never ignored
_CALL_KWARGS = {"mode", "k", "max_tokens", "temperature", "seed", "stop", "filter", "model", "tools", "tool_choice",
                "ls_structured_output_format", "structured_output", "stream", "parallel_tool_calls"}
# other chat models' constructor knobs: what to use instead (any other unknown one is refused too)
_INIT_HINTS = {"top_p": "ChatMSA samples from the full distribution at `temperature`; top_p is not supported",
               "top_k": "ChatMSA samples from the full distribution at `temperature`; top_k is not supported",
               "n": "ChatMSA generates one reply per call", "model_kwargs": "pass ChatMSA's own fields"}

_ROUTING_KNOBS = ("k", "filter", "mode")  # they shape routing over the memory; use_memory=False routes nothing


def _refuse_routing_knobs(values: dict, where: str, collection: bool = False) -> None:
    given = [n for n, v in values.items() if v is not None] + ["collection"] * collection
    if given:
        raise InvalidArgumentError(f"ChatMSA(use_memory=False) answers with the model alone and routes nothing, "
                                   f"so the {where}'s {given} would do nothing: drop them, or use use_memory='auto' "
                                   "(or True) to answer from the memory")


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


def _split_messages(messages: Sequence[BaseMessage], template_tools: bool = False):
    """-> (question, history [{role, content}], system or None, last human text). The question is the last user
    turn (a human message, or a tool result); the other turns are the history, system messages (joined) the
    system prompt. An AI turn that called tools reads as the call it made, and a tool result as a user turn:
    in the chat template's tool format (`<tool_call>` / `<tool_response>`) when `template_tools`, else in the
    JSON protocol's form."""
    if not messages:
        raise InvalidArgumentError("no messages to answer")
    system, turns, human = [], [], None
    for i, m in enumerate(messages):
        if not isinstance(m, BaseMessage):
            raise InvalidTypeError(f"message {i} is a {type(m).__name__}, not a langchain BaseMessage")
        text = _text(m.content, i)
        if m.type == "system":
            system.append(text)
        elif m.type == "ai":
            calls = [template_call_text(c) if template_tools else
                     json.dumps({"name": c["name"], "arguments": c["args"]}, ensure_ascii=False)
                     for c in getattr(m, "tool_calls", None) or []]
            turns.append({"role": "assistant", "content": "\n".join([text] * bool(text.strip()) + calls)})
        elif m.type == "tool":  # the engine's chat roles are system/user/assistant
            name = getattr(m, "name", None)
            turns.append({"role": "user", "content": template_result_text(text) if template_tools else
                          f"Tool result{f' ({name})' if name else ''}: {text}"})
        else:
            turns.append({"role": "user", "content": text})
            human = text
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last_user is None:
        raise InvalidArgumentError("ChatMSA needs a human message to answer")
    question = check_text(turns[last_user]["content"], "question")
    history = turns[:last_user] + turns[last_user + 1:]
    return question, history, ("\n\n".join(system) if system else None), (human or question)


def _quotes(prompt: str):
    """A predicate: does `prompt` quote a memory document verbatim? A retriever chain's stuffed prompt quotes the
    documents it retrieved. Texts under _MIN_QUOTE characters are ignored (a short fact may be part of a real
    question)."""
    def quoted(doc) -> bool:
        t = doc.text.strip()
        return _MIN_QUOTE <= len(t) < len(prompt) and t in prompt
    return quoted


def _document_metadata(docs) -> list:
    return [{"id": d.id, "score": d.score, "round": d.round, "rank": d.rank, "metadata": d.metadata, "text": d.text}
            for d in docs]


# ---------------------------------------------------------------------------------------------- chat model
class ChatMSA(BaseChatModel):
    """Chat model that answers from the `MSAEngine`'s memory (routing + generation in one call).

    The last human message is the question, earlier turns the history, system messages the system prompt.
    `response_metadata["documents"]` lists the routed documents (id, score, round, rank, metadata, text),
    `response_metadata["memory"]` says whether the memory was used ("routed", "off", or why it was skipped);
    `usage_metadata` and `response_metadata["timings"]` are always set.

    Memory (`use_memory`):
        "auto" (default): route on the last human message over `collection`, unless the system or human
            messages already quote documents of the collection verbatim (the stuffed prompt of a retriever
            chain over this memory): then answer from the prompt alone, never routing a second time.
        True: always route.  False: the model alone (e.g. as the LLM of a chain retrieving from elsewhere).
        An empty collection, or no collection document to route to, answers from the model alone.

    Setup:
        engine = MSAEngine.from_pretrained(); engine.add(texts, ids=ids, metadata=metas)
    Instantiate:
        llm = ChatMSA(engine=engine, k=3, max_tokens=128, filter={"topic": "geo"}, collection="default")
        llm = ChatMSA(engine=engine, use_memory=False)     # the model alone
    Invoke / stream / async:
        llm.invoke("question"); llm.stream(...); await llm.ainvoke(...); llm.astream(...)
        per call: k, mode, max_tokens, temperature, seed, stop, filter (anything else raises)
    Tool calling / structured output (through the chat template when it renders tools, as Qwen2/Qwen3's do,
    else a JSON protocol in the prompt; validated, `format_retries` retries):
        llm.bind_tools([add], tool_choice="auto" | "any" | "add"); llm.with_structured_output(Person)
    Token counting:
        llm.get_num_tokens(text) uses the model's own tokenizer.
    """

    engine: Any = Field(exclude=True, description="the MSAEngine")
    model_name: Optional[str] = Field(default=None, alias="model",
                                      description="the engine's model (None: its name); another model is refused")
    mode: Optional[str] = Field(default=None, description="interleave, sparse or protocol (None: the engine's)")
    k: Optional[int] = Field(default=None, description="documents routed per question (None: the engine's)")
    max_tokens: Optional[int] = Field(default=None, alias="max_new_tokens")
    temperature: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[List[str]] = Field(default=None, alias="stop_sequences")
    filter: Any = Field(default=None, description="metadata filter (dict, or a callable taking a Document)")
    collection: str = Field(default=DEFAULT_COLLECTION, description="the collection routed over ('*': all)")
    use_memory: Union[bool, Literal["auto"]] = Field(
        default="auto", description="'auto': route unless the prompt already quotes memory documents; "
                                    "True: always route; False: the model alone")
    format_retries: int = Field(default=2, description="retries when a tool call / JSON reply does not validate")
    streaming: bool = Field(default=False, description="invoke streams (callbacks get each token), as in ChatOpenAI")
    timeout: Optional[float] = Field(default=None, description="seconds one call may take, routing and generation "
                                                               "(None: no limit); past it, CallTimeoutError")
    # LangChain's other standard chat-model parameters (its test suite passes them): a local model makes no API
    # request, so there is no connection to retry or authenticate; accepted so that shared config still builds
    max_retries: Optional[int] = Field(default=None, description="no API request to retry (accepted, unused)")
    api_key: Optional[Any] = Field(default=None, exclude=True, description="no API (accepted, unused)")
    base_url: Optional[str] = Field(default=None, description="no API (accepted, unused)")
    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_fields(cls, data):
        # pydantic drops an unknown field without a word: ChatMSA(top_p=0.1) sampled as if it were never given
        if isinstance(data, dict):
            data = dict(data)
            if "max_completion_tokens" in data:  # OpenAI's newer name for max_tokens
                data.setdefault("max_tokens", data.pop("max_completion_tokens"))
            refuse_unknown(unknown_fields(cls, data), "ChatMSA()", _INIT_HINTS)
        return data

    @field_validator("collection")
    @classmethod
    def _check_collection(cls, v):
        return check_collection(v, allow_all=True)

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, v):
        return check_engine(v, "ChatMSA")

    @model_validator(mode="after")
    def _check_model(self):
        # ChatOpenAI(model=...) picks the model; here the engine has loaded one, and a different name would only be
        # a label: LangSmith and response_metadata would report "gpt-4o-mini" while SmolLM2 answers
        loaded, asked = self.engine.model_name, self.model_name
        if asked is not None and loaded not in (asked, os.path.basename(asked.rstrip("/"))):  # "org/name" is "name"
            raise InvalidArgumentError(f"ChatMSA runs the engine's loaded model {loaded!r}, not model={asked!r}: omit "
                                       f"model= (or pass {loaded!r}), or load that model with "
                                       "MSAEngine.from_pretrained(...)")
        return self

    @model_validator(mode="after")
    def _check_routing_knobs(self):
        if self.use_memory is False:
            _refuse_routing_knobs({n: getattr(self, n) for n in _ROUTING_KNOBS}, "constructor",
                                  self.collection != DEFAULT_COLLECTION)
        return self

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, v):
        if v is not None and not v > 0:
            raise InvalidArgumentError(f"timeout must be a positive number of seconds or None (no limit), got {v!r}")
        return v

    @field_validator("format_retries")
    @classmethod
    def _check_retries(cls, v):
        return check_int(v, "format_retries", minimum=0)

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True  # the settings serialize; the engine is excluded (pass it again when loading)

    @property
    def _llm_type(self) -> str:
        return "msa"

    @property
    def _identifying_params(self) -> dict:
        return {"model_name": self._name(), "mode": self.mode, "k": self.k, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "collection": self.collection, "use_memory": self.use_memory}

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

    def get_token_ids(self, text: str) -> List[int]:
        """The model's own token ids of `text` (LangChain's default would use GPT-2's), or what
        `custom_get_token_ids` gives when it is set, as LangChain's base class does."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.engine.token_ids(text) if text.strip() else []

    def get_num_tokens(self, text: str) -> int:
        return len(self.get_token_ids(text))

    # ------------------------------------------------------------------ tools
    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any):
        """Tools through the model's chat template when it renders them (`engine.supports_tools`: Qwen2/Qwen3,
        replies in `<tool_call>` blocks), else as a JSON protocol in the prompt: the reply is parsed, validated
        against each tool's schema and retried up to `format_retries` times with the error shown to the model. tool_choice: "auto"/None (the
        model may answer in text), "none", "any"/"required", or a tool name (that tool must be called)."""
        formatted = check_tools(list(tools))
        check_tool_choice(tool_choice, formatted)  # a bad choice fails here, not at the first call
        if kwargs.get("ls_structured_output_format") is not None and len(formatted) == 1:
            kwargs["structured_output"] = True  # with_structured_output: ask for the bare JSON object
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    # ------------------------------------------------------------------ one call
    def _deadline(self) -> Optional[float]:
        """When this call must be done (time.monotonic()), or None without a timeout."""
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _check_deadline(self, deadline: Optional[float], doing: str) -> None:
        # checked between tokens: a local forward pass cannot be cut short, so a call overruns by at most one
        if deadline is not None and time.monotonic() > deadline:
            raise CallTimeoutError(f"ChatMSA: the call ran past timeout={self.timeout} s while {doing}; raise "
                                   "timeout (or set None), or ask for less work: a lower max_tokens or k")

    def _pieces(self, stream, deadline: Optional[float], before: str = "routing") -> Iterator[str]:
        """The stream's text pieces, stopping it with CallTimeoutError once the deadline passes (`before`: what
        the call did before its first piece, for the message)."""
        try:
            self._check_deadline(deadline, before)
            for piece in stream:
                yield piece
                self._check_deadline(deadline, "generating")
        finally:  # also on a timeout or when the consumer stops early: the engine stops generating
            stream.close()

    def _options(self, stop: Optional[List[str]], kwargs: dict) -> AnswerOptions:
        """This call's options: per-call kwargs over this model's fields over the engine's defaults (None keeps
        the next one), in LangChain's names. The one place they are mapped, and validated."""
        refuse_unknown([k for k in kwargs if k not in _CALL_KWARGS], "ChatMSA call")
        if not kwargs.get("tools"):  # without tools these would change nothing: a loud error, not a plain answer
            knobs = [k for k in ("tool_choice", "parallel_tool_calls") if kwargs.get(k) not in (None, "auto")]
            if knobs:
                raise InvalidArgumentError(f"{', '.join(knobs)} needs bound tools; call bind_tools([...], "
                                           "tool_choice=...) first, or drop it")
        if kwargs.get("model") not in (None, self._name()):
            raise InvalidArgumentError(f"ChatMSA runs the engine's loaded model {self._name()!r}; it cannot switch "
                                       f"to {kwargs['model']!r} per call (make another engine)")
        return self.engine.answer_defaults.merged(
            mode=kwargs.get("mode", self.mode), k=kwargs.get("k", self.k),
            max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
            temperature=kwargs.get("temperature", self.temperature), seed=kwargs.get("seed", self.seed),
            stop=next((v for v in (stop, kwargs.get("stop"), self.stop) if v is not None), None))  # [] clears

    def _memory(self, messages: List[BaseMessage], kwargs: dict):
        """-> (snapshot, where, note): route over `snapshot` restricted to `where`, or (None, None, note) to
        answer from the prompt alone. The filter is checked first, so a mistake fails whatever the memory holds."""
        if self.use_memory is False:
            _refuse_routing_knobs({n: kwargs.get(n) for n in _ROUTING_KNOBS}, "call")
            return None, None, "off"
        flt = kwargs.get("filter", self.filter)
        where = filter_to_predicate(flt)
        snap = self.engine.snapshot()
        # per call, so nothing here copies the collection's documents: predicates see shallow views (select)
        if where is not None:
            where = snap.select(where, collection=self.collection)
            if not where:  # a filter that admits nothing is a mistake here: there is nothing to answer from
                raise InvalidArgumentError(f"no memory document matches the filter {flt!r}; check the metadata "
                                           "names and values, or drop the filter")
        if self.use_memory == "auto":  # a chain may stuff the context into a system or a human message
            prompt = "\n".join(_text(m.content, i) for i, m in enumerate(messages) if m.type in ("system", "human"))
            quoted = len(snap.select(_quotes(prompt), collection=self.collection))
            if quoted:
                logger.info("ChatMSA: the prompt already quotes %d memory documents; answering without routing",
                            quoted)
                return None, None, f"skipped: the prompt already quotes {quoted} memory document(s)"
        if not (len(snap) if self.collection == ALL_COLLECTIONS else self.collection in snap.collections()):
            return None, None, "skipped: no document in the collection"
        return snap, where, "routed"

    def _run(self, messages: List[BaseMessage], stop: Optional[List[str]], kwargs: dict):
        """Start answering: (the engine's `Stream`, memory note). The engine cuts the text at stop sequences."""
        question, history, system, _ = _split_messages(messages)
        options = self._options(stop, kwargs)
        snap, where, note = self._memory(messages, kwargs)
        if snap is None:
            turns = ([{"role": "system", "content": system}] if system else []) + history + \
                [{"role": "user", "content": question}]
            return self.engine.stream_generate(turns, options), note
        return self.engine.stream(question, options, where=where, history=history or None, snapshot=snap,
                                  system=system, **collection_kwargs(self.engine, self.collection)), note

    def _metadata(self, result, documents, note: str):
        """-> (response_metadata, usage_metadata) of a finished call."""
        timings = dict(result.timings)
        timings.setdefault("routing_s", 0.0)  # plain generation routes nothing: same keys either way
        meta = {"model_name": self._name(), "model_provider": "msa", "finish_reason": result.finish_reason,
                "timings": timings, "mode": result.mode if isinstance(result, QueryResult) else "generate",
                "documents": _document_metadata(documents), "memory": note}
        usage = {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        return meta, usage

    def _chunks(self, started, deadline: Optional[float]) -> Iterator[ChatGenerationChunk]:
        """One chunk per piece, then an empty last chunk with the metadata and usage."""
        stream, note = started
        for piece in self._pieces(stream, deadline):
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        meta, usage = self._metadata(stream.result, stream.documents, note)
        yield ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=meta, usage_metadata=usage,
                                                         chunk_position="last"))

    def _call_tools(self, messages: List[BaseMessage], stop: Optional[List[str]], kwargs: dict,
                    deadline: Optional[float]) -> AIMessage:
        """A turn with tools bound: memory documents in the system prompt, the tools through the model's chat
        template when it renders them (`engine.supports_tools`), else the JSON protocol in the system prompt;
        the reply parsed and validated, retried with the error shown to the model."""
        tools = kwargs["tools"]
        choice = check_tool_choice(kwargs.get("tool_choice"), tools)
        structured = bool(kwargs.get("structured_output")) and len(tools) == 1
        native = choice != "none" and self.engine.supports_tools  # the template's own tool format
        question, history, system, human = _split_messages(messages, template_tools=native)
        options = self._options(stop, kwargs)
        snap, where, note = self._memory(messages, kwargs)
        docs = [] if snap is None else self.engine.retrieve(
            human, k=options.k, where=where, snapshot=snap, **collection_kwargs(self.engine, self.collection))
        parts = [system] if system else []
        if docs:
            parts.append("Relevant memory:\n" + "\n".join(f"- {d.text}" for d in docs))
        if native:  # the template shows the tools; the prompt says only whether a call is required
            must = template_choice_prompt(tools, choice, structured)
            if must:
                parts.append(must)
        elif choice != "none":
            parts.append(schema_prompt(tools[0]) if structured else protocol_prompt(tools, choice))
        turns = [{"role": "system", "content": "\n\n".join(parts)}] if parts else []
        turns += history + [{"role": "user", "content": question}]
        retry_form = ("a <tool_call> block holding one JSON object {\"name\": ..., \"arguments\": {...}}" if native
                      else "only the JSON object")
        one_call = structured or kwargs.get("parallel_tool_calls") is False
        prompt_tokens = completion_tokens = 0
        for attempt in range(1 + self.format_retries):
            stream = self.engine.stream_generate(turns, options, tools=tools if native else None)
            text = "".join(self._pieces(stream, deadline, before="routing" if attempt == 0 else
                                        f"retrying an invalid reply (attempt {attempt + 1})"))
            result = stream.result
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            found, errors = ([], []) if choice == "none" else parse_tool_calls(text, tools, choice)
            if choice == "none" or (choice is None and not found and not looks_like_call(text)):
                calls, invalid = [], []  # a plain answer
                break
            if found:  # every valid call, as a hosted model returns them; one for structured output or when asked
                calls, invalid, text = found[:1] if one_call else found, [], ""
                break
            call = errors[0] if errors else "no JSON object found in the reply"
            logger.info("ChatMSA: reply %d is not a valid tool call (%s)", attempt + 1, call)
            turns += [{"role": "assistant", "content": text},
                      {"role": "user", "content": f"That reply is not valid: {call}. Reply with {retry_form}."}]
        else:
            if choice is not None:
                raise OutputParserException(
                    f"ChatMSA: no valid {'JSON reply' if structured else 'tool call'} after {1 + self.format_retries} "
                    f"attempts (last error: {call}); the model may be too small to follow "
                    f"{'its tool-call format' if native else 'the JSON protocol'}: raise "
                    f"format_retries, simplify the schema, or use a larger model", llm_output=text)
            calls, invalid = [], [{"name": None, "args": text, "id": None, "error": call, "type": "invalid_tool_call"}]
        meta, usage = self._metadata(result, docs, note)
        meta["attempts"] = attempt + 1
        meta["tool_format"] = "chat_template" if native else "json_prompt"
        usage = {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return AIMessage(content=text, tool_calls=calls, invalid_tool_calls=invalid, response_metadata=meta,
                         usage_metadata=usage)

    @staticmethod
    def _as_chunk(msg: AIMessage) -> ChatGenerationChunk:
        calls = [{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i,
                  "type": "tool_call_chunk"} for i, c in enumerate(msg.tool_calls)]
        return ChatGenerationChunk(message=AIMessageChunk(
            content=msg.content, tool_call_chunks=calls, response_metadata=msg.response_metadata,
            usage_metadata=msg.usage_metadata, chunk_position="last"))

    def _generate(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        deadline = self._deadline()
        if kwargs.get("tools"):
            msg = self._call_tools(messages, stop, kwargs, deadline)
        else:
            stream, note = self._run(messages, stop, kwargs)
            text = "".join(self._pieces(stream, deadline))
            meta, usage = self._metadata(stream.result, stream.documents, note)
            msg = AIMessage(content=text, response_metadata=meta, usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=msg)], llm_output={"model_name": self._name()})

    def _stream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        deadline = self._deadline()
        if kwargs.get("tools"):  # a tool call is known only once the whole reply is validated: one chunk
            yield self._as_chunk(self._call_tools(messages, stop, kwargs, deadline))
            return
        for chunk in self._chunks(self._run(messages, stop, kwargs), deadline):
            if run_manager and chunk.message.chunk_position != "last":
                run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    async def _astream(self, messages: List[BaseMessage], stop: Optional[List[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        deadline = self._deadline()
        if kwargs.get("tools"):
            yield self._as_chunk(await asyncio.to_thread(self._call_tools, messages, stop, kwargs, deadline))
            return
        # routing, prefill and every decode step run in a worker thread; callbacks run on the event loop
        async for chunk in aiter_in_thread(lambda: self._chunks(self._run(messages, stop, kwargs), deadline)):
            if run_manager and chunk.message.chunk_position != "last":
                await run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    # _agenerate: BaseChatModel runs _generate in an executor thread, so the event loop never blocks


__all__ = ["ChatMSA"]
