"""Tool calling and structured output for a local model, in one of two forms, the reply parsed and validated
against the tool's JSON schema, with bounded retries that show the model its mistake:

- the chat template's own tool format, when the model's template renders tools (`engine.supports_tools`:
  Qwen2/Qwen3): the schemas go to `engine.generate(..., tools=...)`, the model answers with
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as it was trained to;
- otherwise a JSON protocol in the prompt: a system message says which tools exist (name, description, JSON
  schema of the arguments) and to reply with only `{"name": <tool>, "arguments": {...}}` to call one.

A reply is a tool call when it holds a `<tool_call>` block or a JSON object; otherwise it is a plain answer
(allowed unless a tool call is required). When one tool is forced (structured output), a bare JSON object
of its arguments is accepted too.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, List, Optional, Union

from msa_plugins import InvalidArgumentError, InvalidTypeError

_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
          "null": type(None)}


# ---------------------------------------------------------------------------------------------- schema checks
def schema_errors(value: Any, schema: dict, path: str = "arguments") -> List[str]:
    """What is wrong with `value` under a JSON schema (the subset tools use: type, properties, required,
    additionalProperties, items, enum, anyOf/oneOf, $ref to $defs not followed). [] when it fits."""
    if not isinstance(schema, dict) or not schema:
        return []
    for key in ("anyOf", "oneOf"):
        if key in schema:
            if any(not schema_errors(value, s, path) for s in schema[key]):
                return []
            return [f"{path} matches none of the allowed forms"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path} must be one of {schema['enum']}, got {value!r}"]
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        ok = any(isinstance(value, _TYPES.get(k, object)) and not (k in ("integer", "number")
                 and isinstance(value, bool)) for k in kinds)
        if not ok and "integer" in kinds and isinstance(value, float) and value.is_integer():
            ok = True
        if not ok:
            return [f"{path} must be of type {kind}, got {type(value).__name__} {value!r}"]
    errors = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path} misses the required field {name!r}" for name in schema.get("required", [])
                   if name not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{path} has the unknown field {name!r}" for name in value if name not in props]
        for name, sub in props.items():
            if name in value:
                errors += schema_errors(value[name], sub, f"{path}.{name}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors


# ---------------------------------------------------------------------------------------------- tool choice
def check_tool_choice(tool_choice, tools: List[dict]) -> Optional[str]:
    """LangChain's tool_choice forms -> None (auto), "none", "required", or a tool name."""
    names = [t["function"]["name"] for t in tools]
    if tool_choice in (None, "auto"):
        return None
    if not names:
        raise InvalidArgumentError(f"tool_choice={tool_choice!r} needs at least one bound tool")
    if tool_choice in ("none",):
        return "none"
    if tool_choice in ("any", "required", True):
        return "required"
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    raise InvalidArgumentError(f"tool_choice must be 'auto', 'none', 'any'/'required' or one of the bound tools "
                               f"{names}, got {tool_choice!r}")


def protocol_prompt(tools: List[dict], choice: Optional[str]) -> str:
    """The system-prompt section that teaches the tool-call format."""
    lines = ["You can call these tools:"]
    for t in tools:
        f = t["function"]
        lines.append(f"- {f['name']}: {f.get('description', '').strip() or 'no description'}\n"
                     f"  arguments (JSON schema): {json.dumps(f.get('parameters', {}), ensure_ascii=False)}")
    example = {"name": tools[0]["function"]["name"] if choice in (None, "required") else choice,
               "arguments": {"...": "..."}}
    lines.append(f"To call a tool, reply with only one JSON object, nothing else: {json.dumps(example)}")
    if choice == "required":
        lines.append("You must call one of the tools now.")
    elif choice is not None:
        lines.append(f"You must call the tool {choice!r} now.")
    else:
        lines.append("If no tool is needed, answer normally in plain text.")
    return "\n".join(lines)


def template_choice_prompt(tools: List[dict], choice: Optional[str], structured: bool) -> Optional[str]:
    """What the chat template's tool block does not say: that a call is required (None under "auto")."""
    if structured:
        return f"Answer by calling the tool {tools[0]['function']['name']!r} with the answer as its arguments."
    if choice == "required":
        return "You must call one of the tools now."
    if choice not in (None, "none"):
        return f"You must call the tool {choice!r} now."
    return None


def template_call_text(call: dict) -> str:
    """A past tool call as the chat template's tool format writes it (Qwen2/Qwen3)."""
    return f"<tool_call>\n{json.dumps({'name': call['name'], 'arguments': call['args']}, ensure_ascii=False)}\n</tool_call>"


def template_result_text(text: str) -> str:
    """A tool result as Qwen2/Qwen3's template renders a `tool` message (inside a user turn)."""
    return f"<tool_response>\n{text}\n</tool_response>"


def schema_prompt(tool: dict) -> str:
    """The prompt for a forced single tool used as structured output."""
    f = tool["function"]
    return ("Reply with only one JSON object that fits this JSON schema, nothing else"
            f"{' (' + f['description'].strip() + ')' if f.get('description') else ''}: "
            f"{json.dumps(f.get('parameters', {}), ensure_ascii=False)}")


# ---------------------------------------------------------------------------------------------- parsing
# a chat template's tool call: <tool_call>{...}</tool_call>; a block cut off by the token limit counts too
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?=</tool_call>|<tool_call>|\Z)", re.S)


def tool_call_blocks(text: str) -> List[str]:
    """The contents of the `<tool_call>` blocks in a reply (Qwen2/Qwen3's tool-call format), in order."""
    return [b.strip() for b in _TOOL_CALL_BLOCK.findall(text)]


def _json_objects(text: str):
    """(start, end, value) of every JSON value that starts at a '{' or '[' in `text` (code fences ignored), in
    order of start; values nested in another one come too, after it."""
    text = re.sub(r"```(?:json)?", "", text)
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            value, end = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        yield m.start(), end, value


def looks_like_call(text: str) -> bool:
    """Did the model try to write JSON (so a parse failure is a mistake to retry, not a plain answer)?"""
    return "<tool_call>" in text or "{" in text and ('"name"' in text or '"arguments"' in text or text.lstrip().startswith(("{", "```")))


def parse_tool_calls(text: str, tools: List[dict], choice: Optional[str]) -> tuple:
    """-> (calls, errors): every valid call in the reply as a LangChain tool call {"name", "args", "id", "type"},
    in order, and what is wrong with each JSON value that is not one. A reply with `<tool_call>` blocks is read
    from those blocks only (prose around them may hold other braces); a JSON list holds one call per item. A value
    nested inside a valid call (its arguments) is not read again as a call of its own."""
    blocks = tool_call_blocks(text)
    if blocks:
        text = "\n".join(blocks)
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    forced = choice if choice not in (None, "required", "none") else (
        next(iter(by_name)) if choice == "required" and len(by_name) == 1 else None)
    calls, errors, taken_until = [], [], -1
    for start, end, value in _json_objects(text):
        if start < taken_until:
            continue  # inside a call already taken
        items = value if isinstance(value, list) else [value]
        found = False
        for item in items:
            if not isinstance(item, dict):
                continue
            call = _tool_call(item, by_name, forced)
            if isinstance(call, dict):
                calls.append(call)
                found = True
            else:
                errors.append(call)
        if found:
            taken_until = end
    return calls, errors


def _tool_call(value: dict, by_name: dict, forced: Optional[str]) -> Union[dict, str]:
    """One JSON object as a valid call of one of the tools, or a str saying what is wrong with it."""
    name = value.get("name") or value.get("tool")
    args = value.get("arguments", value.get("args", value.get("parameters")))
    if name is None and forced is not None:  # a bare arguments object for the one forced tool
        name, args = forced, value
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return "arguments is a string that is not JSON"
    if name not in by_name:
        return f"unknown tool {name!r}; the tools are {list(by_name)}"
    if forced is not None and name != forced:
        return f"the tool {forced!r} must be called, not {name!r}"
    args = {} if args is None else args
    problems = schema_errors(args, by_name[name].get("parameters", {}))
    if problems:
        return "; ".join(problems)
    return {"name": name, "args": args, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "tool_call"}


def parse_tool_call(text: str, tools: List[dict], choice: Optional[str]) -> Union[dict, str]:
    """-> the reply's first valid call (`parse_tool_calls`), or a str saying what is wrong."""
    calls, errors = parse_tool_calls(text, tools, choice)
    if calls:
        return calls[0]
    return errors[0] if errors else "no JSON object found in the reply"


def check_tools(tools) -> list:
    """Bound tools as OpenAI tool dicts (the form every LangChain tool can be converted to)."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    if not isinstance(tools, (list, tuple)):
        raise InvalidTypeError("bind_tools takes a list of tools (functions, BaseTools, pydantic models or OpenAI "
                               f"tool dicts), got {type(tools).__name__}")
    return [convert_to_openai_tool(t) for t in tools]


__all__ = ["schema_errors", "check_tool_choice", "protocol_prompt", "schema_prompt", "parse_tool_call",
           "parse_tool_calls", "looks_like_call", "check_tools", "tool_call_blocks", "template_choice_prompt",
           "template_call_text", "template_result_text"]
