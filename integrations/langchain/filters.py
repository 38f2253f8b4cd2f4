"""LangChain-style metadata filters -> a predicate on `MemoryDocument`, which the engine applies before routing.

The filter language is the one `InMemoryVectorStore` / Chroma users write: `{"topic": "geo"}` (equality),
`{"year": {"$gte": 2001}}` with `$eq $ne $gt $gte $lt $lte $in $nin`, and `$and` / `$or` over a list of
filters; or a callable taking a LangChain `Document`. The filter is checked once, when it is translated, so a
mistake fails before any routing work, even on an empty memory. Like the LlamaIndex adapter: a filter of the
wrong type raises `InvalidTypeError` (a TypeError), a wrong value `InvalidArgumentError` (a ValueError).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from langchain_core.documents import Document

from msa_plugins import InvalidArgumentError, InvalidTypeError, MemoryDocument, Snapshot
from msa_plugins.types import PART_KEYS  # what the engine adds to the metadata of a long text's parts

Predicate = Callable[[MemoryDocument], bool]

_OPS = {
    "$eq": lambda a, b: a == b, "$ne": lambda a, b: a != b, "$gt": lambda a, b: a > b, "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b, "$lte": lambda a, b: a <= b, "$in": lambda a, b: a in b, "$nin": lambda a, b: a not in b,
}
# a missing field (None) only satisfies "is not ...": {"year": {"$lt": 2000}} must not admit undated documents
_NONE_ADMITS = ("$ne", "$nin")


def _is_operator_dict(cond) -> bool:
    return isinstance(cond, dict) and bool(cond) and all(isinstance(k, str) and k.startswith("$") for k in cond)


def check_filter(flt) -> None:
    """Refuse a malformed filter (None and callables pass) with an error that names the mistake."""
    if flt is None or callable(flt):
        return
    if not isinstance(flt, dict):
        raise InvalidTypeError(f"filter must be a dict of metadata field -> value (or a callable taking a "
                               f"Document), got {type(flt).__name__}")
    for key, cond in flt.items():
        if not isinstance(key, str):
            raise InvalidTypeError(f"filter keys must be metadata field names (str), got {key!r}")
        if key in ("$and", "$or"):
            if not isinstance(cond, list):
                raise InvalidTypeError(f"{key} takes a list of filters, got {type(cond).__name__}")
            for sub in cond:
                check_filter(sub)
        elif key.startswith("$"):
            raise InvalidArgumentError(f"unknown filter operator {key!r} at the top level; use $and or $or there, "
                                       "and field operators inside a field: {'year': {'$gte': 2001}}")
        elif _is_operator_dict(cond):
            bad = [op for op in cond if op not in _OPS]
            if bad:
                raise InvalidArgumentError(f"unknown filter operator(s) {bad}; use one of {sorted(_OPS)}")
            for op in ("$in", "$nin"):
                if op in cond and not isinstance(cond[op], (list, tuple, set, frozenset)):
                    raise InvalidTypeError(f"filter {key!r} {op} takes a list of values, got {cond[op]!r}")


def matches(metadata: dict, flt: dict) -> bool:
    """Does `metadata` satisfy the (checked) dict filter `flt`?"""
    for key, cond in flt.items():
        if key == "$and":
            if not all(matches(metadata, sub) for sub in cond):
                return False
        elif key == "$or":
            if not any(matches(metadata, sub) for sub in cond):
                return False
        elif _is_operator_dict(cond):
            value = metadata.get(key)
            for op, arg in cond.items():
                if value is None and op not in _NONE_ADMITS:
                    return False
                try:
                    if not _OPS[op](value, arg):
                        return False
                except TypeError as e:  # "geo" > 3: the filter's value has the wrong type for this field
                    raise InvalidTypeError(f"filter {key!r} {op} {arg!r} cannot be compared with metadata value "
                                           f"{value!r}: {e}") from e
        elif metadata.get(key) != cond:
            return False
    return True


def filter_to_predicate(flt: Any) -> Optional[Predicate]:
    """A LangChain filter (dict, or a callable taking a `Document`) -> a predicate on `MemoryDocument` for
    `engine.retrieve/stream(where=...)`; None stays None (no restriction)."""
    check_filter(flt)
    if flt is None:
        return None
    # a part of a long text is shown under the caller's id and metadata (its page_content is the part's text),
    # so all parts of a text are admitted or left out together
    if callable(flt):
        return lambda doc: bool(flt(Document(page_content=doc.text, metadata=caller_metadata(doc), id=doc.whole_id)))
    return lambda doc: matches(caller_metadata(doc), flt)


def caller_metadata(doc) -> dict:
    """A memory document's metadata as the caller gave it: a part of a long text without the part keys."""
    if doc.whole_id == doc.id:
        return dict(doc.metadata)
    return {k: v for k, v in doc.metadata.items() if k not in PART_KEYS}


def filter_to_allow_ids(snapshot: Snapshot, flt: Any) -> Optional[list]:
    """Ids of the documents in `snapshot` that `flt` admits (None: no filter, so no restriction)."""
    predicate = filter_to_predicate(flt)
    return None if predicate is None else snapshot.select(predicate)


__all__ = ["check_filter", "matches", "filter_to_predicate", "filter_to_allow_ids", "caller_metadata", "PART_KEYS"]
