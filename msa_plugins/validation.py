"""Input checks shared by every surface (engine, CLI, LlamaIndex, LangChain): one rule per kind of input,
so the same mistake gets the same error everywhere. A wrong type raises `InvalidTypeError` (a TypeError),
a wrong value `InvalidArgumentError` (a ValueError); the message names the input and what to do.

Imports only `errors`, so every layer may use it.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import KeysView, Mapping, Set as AbstractSet
from typing import Optional

from .errors import InputTooLongError, InvalidArgumentError, InvalidTypeError

# A question longer than this many characters is refused before it is tokenized: tokenizing a huge
# string is itself slow, and no model window holds it (the token limit is checked after tokenizing).
MAX_QUESTION_CHARS = 1_000_000


def _utf8(value: str) -> bool:
    """True when `value` can be written as UTF-8: a lone surrogate (e.g. from bytes decoded with
    errors='surrogateescape') passes every str check but fails the memory's save, so it is refused on the way in."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_utf8(value: str, what: str) -> str:
    if not _utf8(value):
        at = next(i for i, ch in enumerate(value) if not _utf8(ch))
        raise InvalidArgumentError(f"{what} holds a lone surrogate ({value[at]!r} at character {at}), which is not "
                                   "text UTF-8 can store; decode the source with errors='replace', or remove it")
    return value


def unordered(value) -> bool:
    """A set (in hash order: it would pair ids with the wrong texts) or a mapping (it iterates its keys, so
    {id: text} would store the ids as texts). A dict's keys() view keeps insertion order and passes."""
    return isinstance(value, Mapping) or (isinstance(value, AbstractSet) and not isinstance(value, KeysView))


def check_int(value, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An int (not a bool, float or str) within bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidTypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_optional_int(value, name: str, minimum: Optional[int] = None) -> Optional[int]:
    return None if value is None else check_int(value, name, minimum=minimum)


def check_choice(value, choices, name: str):
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"temperature must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"temperature must be a finite number >= 0 (0 is greedy), got {value}")
    return value


def check_stop(stop) -> Optional[tuple]:
    """None, one stop string, or a list of non-empty stop strings (as OpenAI's `stop`)."""
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise InvalidTypeError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidArgumentError(f"stop strings must be non-empty str, got {s!r}")
    return tuple(stop) or None


def check_text(value, what: str = "question") -> str:
    """A non-empty str, else the error every surface gives for it."""
    if not isinstance(value, str):
        raise InvalidTypeError(f"the {what} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidArgumentError(f"the {what} is empty; ask something")
    if what == "question" and len(value) > MAX_QUESTION_CHARS:
        raise InputTooLongError(f"the question has {len(value):,} characters, more than the limit of "
                                f"{MAX_QUESTION_CHARS:,}; shorten it, or add long text to the memory instead")
    return check_utf8(value, f"the {what}")


def check_messages(messages) -> list:
    """Chat messages as [{"role": str, "content": str}, ...], non-empty."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)):
        raise InvalidTypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidTypeError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["role"], str) or m["role"] not in ("system", "user", "assistant"):
            raise InvalidArgumentError(f"message {i} has role {m['role']!r}; use 'system', 'user' or 'assistant'")
        if not isinstance(m["content"], str):
            raise InvalidTypeError(f"message {i} content must be a str, got {type(m['content']).__name__}")
        check_utf8(m["content"], f"message {i}")
        out.append({"role": m["role"], "content": m["content"]})
    if not out:
        raise InvalidArgumentError("no messages to answer")
    return out


def check_history(history) -> Optional[list]:
    """Earlier chat turns before a question: None or a list of messages (a lone string is refused)."""
    if history is None:
        return None
    if isinstance(history, (str, bytes)) or not isinstance(history, (list, tuple)):
        raise InvalidTypeError(f"history must be a list of {{'role', 'content'}} messages, got {type(history).__name__}")
    return check_messages(history) if history else None


def check_texts(texts) -> list:
    if isinstance(texts, (str, bytes)):
        raise InvalidTypeError("texts must be a list of strings, not a single string; wrap it: [text]")
    if unordered(texts):
        raise InvalidTypeError(f"texts must be an ordered list, not a {type(texts).__name__} (its order is not "
                               "the one ids and metadata pair with); pass a list")
    try:
        texts = list(texts)
    except TypeError:
        raise InvalidTypeError(f"texts must be a list of strings, got {type(texts).__name__}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidTypeError(f"text at position {i} is a {type(t).__name__}, not a str; decode or convert it first")
        if not t.strip():
            raise InvalidArgumentError(f"text at position {i} is empty or whitespace only; memory documents need content")
        check_utf8(t, f"text at position {i}")
    return texts


def check_ids(ids, n: int) -> list:
    """`n` unique non-empty str ids (None: the caller generates them). '#' is reserved: `<id>#<part>`
    names the parts of a split long document."""
    if isinstance(ids, (str, bytes)):
        raise InvalidTypeError(f"ids must be a list of str, not a single {type(ids).__name__}; wrap it: [{ids!r}]")
    if unordered(ids):
        raise InvalidTypeError(f"ids must be an ordered list, not a {type(ids).__name__}: its order would pair ids "
                               "with the wrong texts; pass a list in the texts' order")
    ids = list(ids)
    if len(ids) != n:
        raise InvalidArgumentError(f"got {n} texts but {len(ids)} ids; pass one id per text or none")
    seen = set()
    for i, d in enumerate(ids):
        if not isinstance(d, str) or not d.strip():
            raise InvalidTypeError(f"id at position {i} is {d!r}; ids must be non-empty strings")
        check_utf8(d, f"id at position {i}")
        if "#" in d:
            raise InvalidArgumentError(f"id {d!r} contains '#', which names the parts of a split long document "
                                       "(<id>#<part>); use another character")
        if d in seen:
            from .errors import DuplicateIdError
            raise DuplicateIdError(f"duplicate id {d!r} in this call; ids must be unique")
        seen.add(d)
    return ids


def _json_roundtrips(value) -> bool:
    """True when JSON gives back exactly this value (str keys, lists not tuples, finite floats)."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_json_roundtrips(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _utf8(k) and _json_roundtrips(v) for k, v in value.items())
    return False


def check_metadata(metadata, n: int) -> list:
    """One metadata dict per text; only what JSON stores and gives back unchanged (str keys; str, int,
    finite float, bool, None, lists and dicts of those), so a saved memory loads with the same metadata."""
    if metadata is None:
        return [{} for _ in range(n)]
    if isinstance(metadata, dict):
        raise InvalidTypeError("metadata must be a list with one dict per text, not a single dict; wrap it: [metadata]")
    if unordered(metadata):
        raise InvalidTypeError(f"metadata must be an ordered list, not a {type(metadata).__name__}; pass a list in "
                               "the texts' order")
    metadata = list(metadata)
    if len(metadata) != n:
        raise InvalidArgumentError(f"got {n} texts but {len(metadata)} metadata entries; pass one dict per text or none")
    out = []
    for i, m in enumerate(metadata):
        if m is None:
            m = {}
        if not isinstance(m, dict):
            raise InvalidTypeError(f"metadata at position {i} is a {type(m).__name__}; metadata must be a dict")
        if not _json_roundtrips(m):
            raise InvalidTypeError(
                f"metadata at position {i} does not survive saving: {_first_bad(m)}; use str keys and "
                "str/int/float/bool/None values (lists and dicts of those)")
        out.append(json.loads(json.dumps(m)))  # a deep copy: later changes by the caller do not reach the memory
    return out


def _first_bad(m: dict) -> str:
    for k, v in m.items():
        if not isinstance(k, str):
            return f"key {k!r} is a {type(k).__name__}, not a str"
        if not _utf8(k):
            return f"key {k!r} holds a lone surrogate, which UTF-8 cannot store"
        if isinstance(v, str) and not _utf8(v):
            return f"value of {k!r} holds a lone surrogate, which UTF-8 cannot store"
        if not _json_roundtrips(v):
            return f"value of {k!r} is {type(v).__name__} {v!r}"
    return "a value is not JSON"


def check_collection(name, allow_all: bool = False) -> str:
    """A collection name: a non-empty str; "*" (all collections) only where reading allows it."""
    if not isinstance(name, str):
        raise InvalidTypeError(f"collection must be a str, got {type(name).__name__}")
    if not name.strip():
        raise InvalidArgumentError("collection name is empty; name it, or leave the default")
    check_utf8(name, "the collection name")
    if name == "*" and not allow_all:
        raise InvalidArgumentError("collection '*' means all collections: it can be read from, not written to")
    if "*" in name and name != "*":
        raise InvalidArgumentError(f"collection name {name!r} contains '*', which is reserved")
    return name


def check_where_ids(ids) -> list:
    """An allow-list of ids: a collection of str (one str alone is refused: 'ab' is not ['a', 'b'])."""
    if isinstance(ids, (str, bytes)):
        raise InvalidTypeError(f"an allow-list of ids must be a list of str, not one string; wrap it: [{ids!r}]")
    try:
        ids = list(ids)
    except TypeError:
        raise InvalidTypeError(f"an allow-list of ids must be a list of str, got {type(ids).__name__}") from None
    bad = [d for d in ids if not isinstance(d, str)]
    if bad:
        raise InvalidTypeError(f"ids in an allow-list must be str, got {bad[:3]!r}")
    return ids
