"""LlamaIndex `MetadataFilters` -> a predicate on `msa_plugins.MemoryDocument`.

The engine filters before routing (`engine.retrieve(question, where=predicate)`), so translating the
framework's filter language is all an adapter does; this module is the LlamaIndex half (the Chroma
integration's `_to_chroma_filter` is the model). Operators mean what LlamaIndex's own
`build_metadata_filter_fn` makes them mean, plus nested `MetadataFilters` (which it refuses).

Errors follow the rule every surface shares: a filter of the wrong type (not `MetadataFilters`, a
non-str key, a non-list value for `in`/`nin`/`any`/`all`, a value that cannot be compared with a
document's metadata) raises `InvalidTypeError` (a TypeError); a wrong value (an unknown operator or
condition) raises `InvalidArgumentError` (a ValueError). The message names the filter and what to do.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters

from msa_plugins import InvalidArgumentError, InvalidTypeError, MemoryDocument, MSAEngine

Predicate = Callable[[MemoryDocument], bool]
_LIST_OPERATORS = (FilterOperator.IN, FilterOperator.NIN, FilterOperator.ANY, FilterOperator.ALL)

__all__ = ["filters_to_predicate", "filters_to_allow_ids"]


def filters_to_predicate(filters: Union[MetadataFilters, dict, None]) -> Optional[Predicate]:
    """`MetadataFilters` (or a flat `{key: value}` dict, each an equality) -> a predicate on memory
    documents; None for no filter. Checked here, so a malformed filter fails where it is passed, not at
    the first query."""
    if filters is None:
        return None
    if isinstance(filters, dict):
        bad = [k for k in filters if not isinstance(k, str)]
        if bad:
            raise InvalidTypeError(f"metadata filter keys must be str, got {bad!r}")
        filters = MetadataFilters(filters=[MetadataFilter(key=k, value=v) for k, v in filters.items()])
    if not isinstance(filters, MetadataFilters):
        raise InvalidTypeError(f"filters must be a llama_index MetadataFilters (or a {{key: value}} dict), "
                               f"got {type(filters).__name__}")
    if not filters.filters:  # as SimpleVectorStore: no filter in the list restricts nothing, whatever the condition
        return None
    match = _compile(filters)

    def predicate(doc: MemoryDocument) -> bool:
        try:
            return match(doc.metadata)
        except TypeError as e:  # e.g. "pt" > 3: the filter's value does not fit this document's metadata
            raise InvalidTypeError(f"metadata filter {filters.filters!r} cannot be compared with document "
                                   f"{doc.id!r}'s metadata {doc.metadata!r}: {e}; use a value of the stored "
                                   "type") from e

    return predicate


def filters_to_allow_ids(engine: MSAEngine, filters: Union[MetadataFilters, dict, None], snapshot=None) -> Optional[list]:
    """The ids of the memory documents (of `snapshot`, default: the engine's now) that `filters` admit;
    None for no filter."""
    predicate = filters_to_predicate(filters)
    if predicate is None:
        return None
    return (snapshot if snapshot is not None else engine.snapshot()).select(predicate)


def _compile(filters: MetadataFilters) -> Callable[[dict], bool]:
    """A `MetadataFilters` tree -> a function of a metadata dict (sub-filters compiled once)."""
    parts = [_compile(f) if isinstance(f, MetadataFilters) else _compile_one(f) for f in filters.filters]
    condition = filters.condition or FilterCondition.AND
    if not parts:  # an empty group restricts nothing (an empty OR would otherwise admit nothing)
        if condition not in (FilterCondition.AND, FilterCondition.OR, FilterCondition.NOT):
            raise InvalidArgumentError(f"unknown filter condition {condition!r}; use one of "
                                       f"{[c.value for c in FilterCondition]}")
        return lambda meta: True
    if condition == FilterCondition.AND:
        return lambda meta: all(p(meta) for p in parts)
    if condition == FilterCondition.OR:
        return lambda meta: any(p(meta) for p in parts)
    if condition == FilterCondition.NOT:  # LlamaIndex's meaning: none of the filters matches
        return lambda meta: not any(p(meta) for p in parts)
    raise InvalidArgumentError(f"unknown filter condition {condition!r}; use one of {[c.value for c in FilterCondition]}")


def _compile_one(f: Any) -> Callable[[dict], bool]:
    key = getattr(f, "key", None)
    if not isinstance(key, str):
        raise InvalidTypeError(f"metadata filter keys must be str, got {key!r}")
    operator = getattr(f, "operator", FilterOperator.EQ)  # ExactMatchFilter has no operator: equality
    try:
        operator = FilterOperator(operator)
    except ValueError:
        raise InvalidArgumentError(f"unknown filter operator {operator!r} on key {key!r}; use one of "
                                   f"{[o.value for o in FilterOperator]}") from None
    value = f.value
    if operator in _LIST_OPERATORS and not isinstance(value, list):
        raise InvalidTypeError(f"the {operator.value!r} filter on {key!r} needs a list value, got {value!r}; "
                               f"wrap it: [{value!r}]")
    test = _OPERATORS[operator]

    def match(meta: dict) -> bool:
        stored = meta.get(key)
        if operator == FilterOperator.IS_EMPTY:
            return stored is None or stored == "" or stored == []
        if stored is None:  # a missing key matches only the negative operators, as in LlamaIndex
            return operator in (FilterOperator.NE, FilterOperator.NIN)
        return test(stored, value)

    return match


def _text_match(stored, value, fold) -> bool:
    if not (isinstance(stored, str) and isinstance(value, str)):
        raise TypeError("text_match filters need a str value and str metadata")
    return fold(value) in fold(stored)


# operator -> test(stored metadata value, filter value)
_OPERATORS = {
    FilterOperator.EQ: lambda s, v: s == v,
    FilterOperator.NE: lambda s, v: s != v,
    FilterOperator.GT: lambda s, v: s > v,
    FilterOperator.GTE: lambda s, v: s >= v,
    FilterOperator.LT: lambda s, v: s < v,
    FilterOperator.LTE: lambda s, v: s <= v,
    FilterOperator.IN: lambda s, v: s in v,
    FilterOperator.NIN: lambda s, v: s not in v,
    FilterOperator.ANY: lambda s, v: any(x in s for x in v),
    FilterOperator.ALL: lambda s, v: all(x in s for x in v),
    FilterOperator.CONTAINS: lambda s, v: v in s,
    FilterOperator.TEXT_MATCH: lambda s, v: _text_match(s, v, str),
    FilterOperator.TEXT_MATCH_INSENSITIVE: lambda s, v: _text_match(s, v, str.lower),
    FilterOperator.IS_EMPTY: None,  # handled in match(): it is the one operator that looks at missing keys
}
