"""No silent knobs: the one check both adapters use for arguments they do not read.

pydantic drops a constructor argument it does not know without a word, so `MSARetriever(search_kwargs=...)` or
`MSAMemoryBlock(similarity_top_k=5)` built and then behaved as if never told. Code written for another retriever,
vector store or memory passes that class's knobs; each must be refused, naming it (and, where one exists, what to
use instead).

Imports nothing from the adapters: both the LlamaIndex and the LangChain ones use it.
"""

from __future__ import annotations

from typing import Iterable, Optional

from msa_plugins import InvalidArgumentError, InvalidTypeError, MSAEngine

__all__ = ["refuse_unknown", "unknown_fields", "check_engine"]


def check_engine(engine, where: str) -> MSAEngine:
    """`engine` if it is an `MSAEngine`; else an `InvalidTypeError` saying how to make one (not an AttributeError at
    the first use)."""
    if not isinstance(engine, MSAEngine):
        got = "nothing" if engine is None else f"a {type(engine).__name__}"
        raise InvalidTypeError(f"{where} needs engine=MSAEngine.from_pretrained(...), got {got}")
    return engine


def refuse_unknown(names: Iterable[str], where: str, hints: Optional[dict] = None) -> None:
    """Raise `InvalidArgumentError` naming `names` (arguments `where` does not read), with the hints for them."""
    names = sorted(names)
    if not names:
        return
    hints = hints or {}
    notes = "; ".join(dict.fromkeys(hints[k] for k in names if k in hints))  # one hint once, in order
    raise InvalidArgumentError(f"{where} got unknown argument(s) {names}" + (f": {notes}" if notes else "")
                               + "; see docs/integrations.md for the supported ones")


def unknown_fields(model_cls, data) -> list:
    """The keys of `data` (a constructor's keyword arguments) that are neither a field nor a field's alias of the
    pydantic model `model_cls`."""
    if not isinstance(data, dict):
        return []
    fields = model_cls.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    return [k for k in data if k not in known]
