"""`MSALLM`: the engine's model as a LlamaIndex `FunctionCallingLLM` (no memory), shaped like
`llama-index-llms-ollama`: chat and stream_chat are implemented once (sync and async); complete and
stream_complete are derived from them with LlamaIndex's own decorators.

Tool calling (`FunctionAgent`, `chat_with_tools`, `predict_and_call`) and structured output
(`structured_predict`, `as_structured_llm`: LlamaIndex runs them as a call of a tool whose parameters are
the output class) take one of two forms:
- the chat template's own tool format when the model's template renders tools (`engine.supports_tools`:
  Qwen2/Qwen3): the tools' JSON schemas go to `engine.generate(..., tools=...)` and the model replies with
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as it was trained to;
- otherwise a JSON protocol in the prompt: the model is shown the tools and their JSON schemas in the
  system message and replies with `{"name": ..., "arguments": {...}}`.
Either way the reply is parsed and its arguments validated against the tool's schema; an invalid one is
sent back to the model with the error, at most `max_retries` times.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from llama_index.core.base.llms.generic_utils import (achat_to_completion_decorator,
                                                      astream_chat_to_completion_decorator,
                                                      chat_to_completion_decorator,
                                                      stream_chat_to_completion_decorator)
from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen,
                                              CompletionResponse, CompletionResponseAsyncGen,
                                              CompletionResponseGen, LLMMetadata, MessageRole)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from pydantic import Field, PrivateAttr, ValidationError

from msa_plugins import (AnswerOptions, GenerationResult, InvalidArgumentError, InvalidTypeError, MSAEngine,
                         ToolCallError)
from msa_plugins.validation import check_text

from .._aio import aiter_in_thread
from .._fields import check_engine

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

logger = logging.getLogger(__name__)

__all__ = ["MSALLM", "ToolCallError", "parse_tool_calls"]

# what one call reads (the generation knobs, and what LlamaIndex's tool calling passes); anything else is refused,
# never ignored: code written for another LLM passes its own knobs, and they must not silently do nothing
CALL_KWARGS = ("max_new_tokens", "max_tokens", "temperature", "stop", "seed", "tools", "tool_required", "tool_choice",
               "allow_parallel_tool_calls", "extra_headers")
# max_tokens (OpenAI's name, which LlamaIndex's own DocumentContextExtractor passes) is max_new_tokens;
# extra_headers are HTTP headers for a hosted API: a local model has no request to put them on
KNOB_HINTS = {"num_output": "MSALLM's name for num_output is max_new_tokens",
              "top_p": "MSALLM samples from the full distribution at `temperature`; top_p is not supported",
              "top_k": "MSALLM samples from the full distribution at `temperature`; top_k is not supported"}


def _refuse_unknown(names, where: str) -> None:
    if names:
        notes = "; ".join(KNOB_HINTS[k] for k in names if k in KNOB_HINTS)
        raise InvalidArgumentError(f"{where} got argument(s) it does not support: {sorted(names)}"
                                   + (f" ({notes})" if notes else "") + f"; a call takes {', '.join(CALL_KWARGS)}")


def _max_new_tokens(kwargs: dict, default: Optional[int]) -> Optional[int]:
    """max_new_tokens, or OpenAI's max_tokens for it; both, disagreeing, is refused."""
    new, openai = kwargs.get("max_new_tokens"), kwargs.get("max_tokens")
    if new is not None and openai is not None and new != openai:
        raise InvalidArgumentError(f"max_new_tokens={new} and max_tokens={openai} disagree; pass one of them")
    return new if new is not None else openai if openai is not None else default


class MSALLM(FunctionCallingLLM):
    """The engine's model as a LlamaIndex LLM: complete/chat, streaming, async (generation runs in a worker
    thread, so the event loop keeps running), tool calling and structured output.

    `raw` of each response (of the last chunk when streaming) holds `timings`, `usage` (the model's own
    token counts, which LlamaIndex's `TokenCountingHandler` reads) and `finish_reason`. Per call,
    `max_new_tokens`, `temperature`, `stop` and `seed` override the fields.

        llm = MSALLM(engine=engine, max_new_tokens=64)
        llm.complete("Where is Paris?").text
        FunctionAgent(tools=[add], llm=llm)             # tools via the chat template, else a JSON protocol
        llm.structured_predict(Invoice, PromptTemplate("..."))
    """

    max_new_tokens: Optional[int] = Field(default=None, description="tokens to generate; None: the engine's default")
    temperature: Optional[float] = Field(default=None, description="0 is greedy; None: the engine's default")
    seed: Optional[int] = Field(default=None, description="sampling seed (temperature > 0)")
    max_retries: int = Field(default=2, ge=0, description="re-asks after an invalid tool call / structured output")
    _engine: Any = PrivateAttr()  # an MSAEngine

    def __init__(self, engine: Optional[MSAEngine] = None, **kwargs: Any):
        check_engine(engine, "MSALLM")
        # pydantic would drop an unknown field without a word (MSALLM(max_tokens=3) generating 128 tokens)
        if "max_tokens" in kwargs:  # OpenAI's name for it
            kwargs["max_new_tokens"] = _max_new_tokens(kwargs, None)
            del kwargs["max_tokens"]
        _refuse_unknown([k for k in kwargs if k not in type(self).model_fields], "MSALLM()")
        super().__init__(**kwargs)
        self._engine = engine
        self._options({})  # max_new_tokens=-1, temperature=nan, ... fail here, not at the first call

    @classmethod
    def class_name(cls) -> str:
        return "MSALLM"

    @property
    def engine(self) -> MSAEngine:
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self._engine.context_window, num_output=self._options({}).max_new_tokens,
                           is_chat_model=True, is_function_calling_model=True, model_name=self._engine.model_name)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under the model's own tokenizer."""
        return self._engine.count_tokens(text)

    def _options(self, kwargs: dict) -> AnswerOptions:
        """This LLM's fields and one call's kwargs -> the engine's options (None keeps the engine's default)."""
        _refuse_unknown([k for k in kwargs if k not in CALL_KWARGS], "MSALLM chat/complete")
        return self._engine.answer_defaults.merged(
            max_new_tokens=_max_new_tokens(kwargs, self.max_new_tokens),
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
        if _offers_tools(kwargs):
            return self._chat_with_tool_protocol(messages, kwargs)
        result = self._engine.generate(_to_engine_messages(messages), self._options(kwargs))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text), raw=_raw(result))

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict) -> ChatResponseGen:
        if _offers_tools(kwargs):
            # a tool call is known only once the reply is complete and valid: one chunk with all of it
            response = self._chat_with_tool_protocol(messages, kwargs)
            return iter([ChatResponse(message=response.message, delta=response.message.content or "",
                                      raw=response.raw)])
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

    # ------------------------------------------------------------------ tool calling
    def _prepare_chat_with_tools(self, tools: Sequence["BaseTool"], user_msg: Optional[Union[str, ChatMessage]] = None,
                                 chat_history: Optional[List[ChatMessage]] = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                 **kwargs: Any) -> Dict[str, Any]:
        choice = kwargs.pop("tool_choice", None)
        # "none": a plain chat, no tool shown (the returned kwargs carry no tools)
        tools, tool_required = ([], False) if choice == "none" else _apply_tool_choice(tools, tool_required, choice)
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str)
                            else user_msg)
        # the tool instructions go into the messages here, so tracing shows what the model is shown (with a
        # template that renders tools, the template shows them: the prompt says only whether a call is required)
        if not tools:
            prompt = None
        elif self._engine.supports_tools:
            prompt = REQUIRED_NOTE if tool_required else None
        else:
            prompt = _tool_prompt(tools, tool_required)
        if prompt is not None:
            if messages and messages[0].role == MessageRole.SYSTEM and isinstance(messages[0].content, str):
                messages[0] = ChatMessage(role=MessageRole.SYSTEM, content=messages[0].content + "\n\n" + prompt)
            else:
                messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=prompt))
        return {"messages": messages, "tools": list(tools), "tool_required": tool_required,
                "allow_parallel_tool_calls": allow_parallel_tool_calls, **kwargs}

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> List[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls and error_on_no_tool_call:
            raise ToolCallError(f"the model answered without calling a tool: {response.message.content!r}")
        return [ToolSelection(tool_id=c["id"], tool_name=c["name"], tool_kwargs=c["arguments"]) for c in calls]

    def _chat_with_tool_protocol(self, messages: Sequence[ChatMessage], kwargs: dict) -> ChatResponse:
        """Show the tools (through the chat template when it renders them, else the JSON protocol in the
        system message), parse the reply, validate it against the tools' schemas; re-ask with the error (at
        most `max_retries` times). A reply with no call is a plain answer unless a tool is required."""
        tools, required = _apply_tool_choice(kwargs["tools"], bool(kwargs.get("tool_required")),
                                             kwargs.get("tool_choice"))
        parallel = bool(kwargs.get("allow_parallel_tool_calls"))
        options = self._options(kwargs)
        native = self._engine.supports_tools
        convo = _to_engine_messages(messages, template_tools=native)
        if native:
            schemas = [_openai_tool(t) for t in tools]
            if required and not any(m["role"] == "system" and REQUIRED_NOTE in m["content"] for m in convo):
                convo = _with_system(convo, REQUIRED_NOTE)  # chat(messages, tools=...) called directly
        elif not any(m["role"] == "system" and TOOL_PROMPT_HEAD in m["content"] for m in convo):
            convo = _with_system(convo, _tool_prompt(tools, required))  # chat(messages, tools=...) called directly
        retry_form = ('a <tool_call> block holding {"name": ..., "arguments": {...}}' if native else
                      'only the JSON object {"name": ..., "arguments": {...}}')
        prompt_tokens = completion_tokens = 0
        error = ""
        for attempt in range(self.max_retries + 1):
            result = self._engine.generate(convo, options, tools=schemas if native else None)
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            try:
                calls = parse_tool_calls(result.text, tools)
            except ValueError as e:
                error = str(e)
            else:
                if calls:
                    if not parallel:
                        calls = calls[:1]
                    raw = _raw(result, prompt_tokens, completion_tokens, attempts=attempt + 1, native=native)
                    # the calls as text in the form the model is shown them again in the history
                    content = (_template_calls_text(calls) if native else
                               json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls]))
                    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=content,
                                                            additional_kwargs={"tool_calls": calls}), raw=raw)
                if not required:  # no call at all: the model answered in text
                    return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text),
                                        raw=_raw(result, prompt_tokens, completion_tokens, attempts=attempt + 1,
                                                 native=native))
                error = "no tool call found; a tool call is required"
            logger.info("tool call attempt %d was not valid (%s); asking again", attempt + 1, error)
            convo = convo + [{"role": "assistant", "content": result.text or "(empty)"},
                             {"role": "user", "content": f"That was not a valid tool call: {error}. Reply with "
                                                         f"{retry_form}."}]
        if required:
            raise ToolCallError(f"the model gave no valid tool call in {self.max_retries + 1} attempts (last error: "
                                f"{error}); raise max_retries, or use a larger or tool-trained model")
        logger.warning("the model gave no valid tool call in %d attempts (%s); returning its text as the answer",
                       self.max_retries + 1, error)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text),
                            raw=_raw(result, prompt_tokens, completion_tokens, attempts=self.max_retries + 1,
                                     native=native))


# ---------------------------------------------------------------------------------------------- tool-call formats
TOOL_PROMPT_HEAD = "You can call tools. To call one, reply with only a JSON object and nothing else:"
REQUIRED_NOTE = "You must call one of the tools."  # with a template that renders tools, the only instruction
# a chat template's tool call (Qwen2/Qwen3): <tool_call>{...}</tool_call>; a block cut off by the token limit counts
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?=</tool_call>|<tool_call>|\Z)", re.S)


def _offers_tools(kwargs: dict) -> bool:
    """Does this chat call show the model tools (chat(messages, tools=..., tool_choice="none") does not)?"""
    return bool(kwargs.get("tools")) and kwargs.get("tool_choice") != "none"


def _apply_tool_choice(tools: Sequence["BaseTool"], required: bool, choice: Any):
    """OpenAI's `tool_choice` (what LlamaIndex's FunctionCallingProgram and FunctionAgent pass) -> the tools
    offered and whether a call is required: None/"auto" keep both; "required"/"any" require a call; "none"
    offers no tool (handled by the caller: a plain chat); a tool's name, or {"type": "function", "function":
    {"name": ...}}, offers that tool alone and requires it."""
    tools = list(tools)
    if choice is None or choice in ("auto", "none"):
        return tools, required
    if choice in ("required", "any"):
        return tools, True
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else choice
    chosen = [t for t in tools if t.metadata.name == name]
    if not isinstance(name, str) or not chosen:
        raise InvalidArgumentError(f"tool_choice={choice!r} names no tool given ({[t.metadata.name for t in tools]}); "
                                   f"pass 'auto', 'required', 'none', a tool's name or "
                                   f"{{'type': 'function', 'function': {{'name': ...}}}}")
    return chosen, True


def _openai_tool(tool: "BaseTool") -> dict:
    """A LlamaIndex tool as the OpenAI-style function schema chat templates render (name kept as is: the
    reply is matched against it)."""
    return {"type": "function", "function": {"name": tool.metadata.name, "description": tool.metadata.description,
                                             "parameters": tool.metadata.get_parameters_dict()}}


def _tool_prompt(tools: Sequence["BaseTool"], required: bool) -> str:
    lines = [TOOL_PROMPT_HEAD,
             '{"name": "<tool name>", "arguments": {<arguments matching the tool\'s JSON schema>}}', "Tools:"]
    for tool in tools:
        lines.append(f"- {tool.metadata.name}: {tool.metadata.description}\n  arguments schema: "
                     f"{json.dumps(tool.metadata.get_parameters_dict())}")
    lines.append("You must call one of the tools." if required else
                 "If no tool is needed, answer the user in plain text without JSON.")
    return "\n".join(lines)


def _template_calls_text(calls: List[dict]) -> str:
    """Tool calls as a chat template's tool format writes them (Qwen2/Qwen3)."""
    return "\n".join(f"<tool_call>\n{json.dumps({'name': c.get('name'), 'arguments': c.get('arguments')}, ensure_ascii=False)}"
                     "\n</tool_call>" for c in calls)


def _with_system(messages: List[dict], prompt: str) -> List[dict]:
    """`prompt` as (the end of) the system message."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + prompt}] + messages[1:]
    return [{"role": "system", "content": prompt}] + messages


def _json_values(text: str) -> List[Any]:
    """Every top-level JSON object or list embedded in `text` (code fences and prose around it allowed)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                i += 1
                continue
            out.append(value)
            i = end
        else:
            i += 1
    return out


def parse_tool_calls(text: str, tools: Sequence["BaseTool"]) -> List[dict]:
    """The tool calls in a model reply, validated: [{"id", "name", "arguments"}]. A reply with `<tool_call>`
    blocks (a chat template's format) is read from those blocks only, else every JSON value in it counts.
    [] when the reply holds no call at all; ValueError naming the problem when it holds one that is not a
    valid call."""
    by_name = {t.metadata.name: t for t in tools}
    blocks = _TOOL_CALL_BLOCK.findall(text)
    values = _json_values("\n".join(blocks) if blocks else text)
    if blocks and not values:
        raise ValueError("a <tool_call> block holds no JSON object")
    if not values:
        return []
    candidates = [v for value in values for v in (value if isinstance(value, list) else [value])]
    calls, errors = [], []
    for c in candidates:
        if not isinstance(c, dict):
            errors.append(f"{c!r} is not a JSON object")
            continue
        name = c.get("name", c.get("tool"))
        arguments = c.get("arguments", c.get("parameters", {}))
        if name not in by_name:
            errors.append(f"unknown tool {name!r} (tools: {sorted(by_name)})")
            continue
        if isinstance(arguments, str):  # OpenAI's shape: arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                errors.append(f"arguments of {name!r} are not JSON: {e}")
                continue
        if not isinstance(arguments, dict):
            errors.append(f"arguments of {name!r} must be a JSON object, got {arguments!r}")
            continue
        schema = by_name[name].metadata.fn_schema
        if schema is not None:
            try:
                schema.model_validate(arguments)
            except ValidationError as e:
                errors.append(f"arguments of {name!r} do not match its schema: "
                              + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
                continue
        calls.append({"id": f"call_{uuid.uuid4().hex[:12]}", "name": name, "arguments": arguments})
    if not calls:
        raise ValueError("; ".join(errors))
    return calls


def _to_engine_messages(messages: Sequence[ChatMessage], template_tools: bool = False) -> list:
    """LlamaIndex chat messages -> the engine's [{"role", "content"}] (its chat template renders them).
    Tool calls and tool results become text: in the chat template's tool format (`<tool_call>` /
    `<tool_response>`, as Qwen2/Qwen3 render them) when `template_tools`, else in the JSON protocol's shape."""
    out = []
    for m in messages:
        role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
        content = m.content if m.content is not None else ""
        if not isinstance(content, str):
            raise InvalidTypeError(f"message content must be text, got {type(content).__name__}")
        calls = m.additional_kwargs.get("tool_calls")
        if role == "assistant" and calls:
            calls = [c for c in calls if isinstance(c, dict)]
            if template_tools and "<tool_call>" not in content:
                content = "\n".join([content] * bool(content.strip()) + [_template_calls_text(calls)])
            elif not template_tools and not content:
                content = json.dumps([{"name": c.get("name"), "arguments": c.get("arguments")} for c in calls])
        if role == "tool":
            name = m.additional_kwargs.get("name") or m.additional_kwargs.get("tool_name") or "the tool"
            role, content = "user", (f"<tool_response>\n{content}\n</tool_response>" if template_tools
                                     else f"Result of {name}: {content}")
        elif role not in ("system", "user", "assistant"):
            # "model" / "chatbot" are the assistant under other names; anything else is text the user supplied
            role = "assistant" if role in ("model", "chatbot") else "user"
        out.append({"role": role, "content": content})
    return out


def _raw(result: GenerationResult, prompt_tokens: Optional[int] = None, completion_tokens: Optional[int] = None,
         attempts: Optional[int] = None, native: Optional[bool] = None) -> dict:
    p = result.prompt_tokens if prompt_tokens is None else prompt_tokens
    c = result.completion_tokens if completion_tokens is None else completion_tokens
    raw = {"timings": dict(result.timings), "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
           "finish_reason": result.finish_reason}
    if attempts is not None:
        raw["attempts"] = attempts
    if native is not None:
        raw["tool_format"] = "chat_template" if native else "json_prompt"
    return raw
