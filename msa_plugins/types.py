"""The public value types of msa-plugins: what the engine hands to adapters, the CLI and evaluation.

`Snapshot` is a read-only view of the memory at one moment (documents only, no tensors); `retrieve`
returns `RoutedDocument`s; every streaming call returns one `Stream` type whose `result` is a
`QueryResult` (answering from memory) or a `GenerationResult` (plain generation). Timings and usage are
built in one place (`GenerationStats`, in the engine) and only carried here.

This module imports nothing else from the package, so every layer may use it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Union

from .errors import DocumentNotFoundError, InvalidTypeError

# the metadata keys the parts of a text longer than the model's window carry (`<id>#<part>`): the whole text's id
# and the part's number. Written by the engine's ingest, stripped again by adapters that hand back whole texts.
PART_KEYS = ("parent_id", "part")


def _whole_id(doc_id: str, metadata: dict) -> str:
    parent, part = (metadata.get(k) for k in PART_KEYS)
    return parent if parent is not None and doc_id == f"{parent}#{part}" else doc_id


@dataclass(frozen=True)
class MemoryDocument:
    """One document as the memory holds it (a long document's parts are documents `<id>#<part>`)."""
    id: str
    text: str
    metadata: dict
    n_tokens: int
    collection: str = "default"

    @property
    def whole_id(self) -> str:
        """The id the text was added under: `<id>` for a part `<id>#<p>` of a text longer than the window."""
        return _whole_id(self.id, self.metadata)


@dataclass
class RoutedDocument:
    """A document the router selected for a question, with its score and where it was found."""
    id: str
    text: str
    score: float  # layer-mean routing score (cosine by default); NaN for documents not chosen by routing
    metadata: dict
    round: int = 0  # routing round (interleave re-routing) or protocol step that found it
    rank: int = 0  # position within its round, best first
    collection: str = "default"

    @property
    def whole_id(self) -> str:
        """The id the text was added under: `<id>` for a part `<id>#<p>` of a text longer than the window."""
        return _whole_id(self.id, self.metadata)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class QueryResult:
    """An answer from memory."""
    answer: str
    mode: str
    documents: list  # RoutedDocument, in routing order (all rounds)
    rounds: list  # per round: list of RoutedDocument
    per_layer: dict  # routing layer -> (ids, scores) of that layer's own selection (first round)
    timings: dict  # routing_s, prefill_s, decode_s, first_token_s, total_s
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"  # "stop" (end of text or a stop string) or "length" (max_new_tokens)
    abstained: bool = False  # True: routing fell below the memory's calibrated threshold (answer: NOT_IN_MEMORY)

    @property
    def usage(self) -> dict:
        return _usage(self.prompt_tokens, self.completion_tokens)

    @property
    def text(self) -> str:
        return self.answer


@dataclass
class GenerationResult:
    """Plain generation (no memory)."""
    text: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict  # prefill_s, decode_s, first_token_s, total_s
    finish_reason: str = "stop"

    @property
    def usage(self) -> dict:
        return _usage(self.prompt_tokens, self.completion_tokens)


class Stream:
    """Text pieces of one answer or generation, as they are produced.

    `documents` (the routed documents; empty for plain generation) is known before the first piece;
    `result` (a `QueryResult` or `GenerationResult`, with timings and usage) once iteration ends, also
    when the caller stops early or calls `close()`. Iterate once.
    """

    def __init__(self, documents: list, pieces: Iterator[str], finish: Callable[[str], object]):
        self.documents = documents
        self._pieces = pieces
        self._finish = finish
        self._parts: list = []
        self.result = None

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self._pieces:
                self._parts.append(piece)
                yield piece
        finally:  # also when the caller stops reading early: usage and timings of what was generated
            self.close()

    def close(self) -> None:
        """Stop generating; `result` then describes what was generated so far."""
        if self.result is None:
            close = getattr(self._pieces, "close", None)
            if close is not None:
                close()
            self.result = self._finish("".join(self._parts))

    def collect(self):
        """Consume the stream; return its result."""
        for _ in self:
            pass
        return self.result


Where = Union[Callable[[MemoryDocument], bool], Iterable[str], None]


class Snapshot:
    """A read-only view of the memory at one moment: later adds and deletes do not change it.

    Pass it back to `MSAEngine.retrieve/stream(..., snapshot=s)` to answer from exactly this view.
    """

    def __init__(self, state, nbytes: int = 0):
        self._state = state  # the engine's immutable bank state; private: its tensors are not an API
        self._nbytes = nbytes

    def __len__(self) -> int:
        return len(self._state.ids)

    def __contains__(self, doc_id) -> bool:
        return isinstance(doc_id, str) and bool(self._state.rows_for(doc_id))

    def __iter__(self) -> Iterator[MemoryDocument]:
        return self.documents()

    @property
    def ids(self) -> list:
        """Memory document ids in storage order (a long document's parts appear as `<id>#<part>`)."""
        return list(self._state.ids)

    @property
    def n_tokens(self) -> int:
        return int(sum(self._state.n_tokens))

    @property
    def n_chunks(self) -> int:
        return int(self._state.n_chunks)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def _doc(self, row: int, deep: bool = True) -> MemoryDocument:
        """Row -> the document handed out, its metadata a deep copy (a caller editing a nested list must not edit
        the memory); deep=False (a shallow copy, 50x cheaper) for documents only shown to a `where` predicate."""
        s = self._state
        metadata = copy.deepcopy(s.metadata[row]) if deep else dict(s.metadata[row])
        return MemoryDocument(s.ids[row], s.texts[row], metadata, int(s.n_tokens[row]), s.collections[row])

    def collections(self) -> list:
        """The collections that hold documents, sorted."""
        return sorted(self._state.collection_counts)

    def documents(self, collection: Optional[str] = None) -> Iterator[MemoryDocument]:
        """Every document (of `collection`, when given; "*" or None: all), in storage order."""
        cols = self._state.collections
        for row in range(len(self)):
            if collection in (None, "*") or cols[row] == collection:
                yield self._doc(row)

    def get(self, ids) -> list:
        """Documents by id, in the order asked; a split long document's id gives its parts, in order.
        Unknown ids raise `DocumentNotFoundError` naming them."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        missing = [d for d in ids if d not in self]
        if missing:
            raise DocumentNotFoundError(f"unknown document id(s) {missing[:5]}; the memory holds {len(self)} "
                                        "documents (snapshot().ids lists them)")
        return [self._doc(r) for d in ids for r in self._state.rows_for(d)]

    def select(self, where: Where, collection: Optional[str] = None) -> list:
        """Ids of the memory documents that `where` admits (a predicate on `MemoryDocument`, or ids;
        an id of a split long document admits all its parts), within `collection` when given ("*" or None:
        all). None admits all."""
        if collection not in (None, "*"):
            cols = self._state.collections
            if callable(where):  # the predicate sees only the collection's documents
                return [self._state.ids[r] for r in range(len(self))
                        if cols[r] == collection and where(self._doc(r, deep=False))]
            inside = self.select(where)
            return [d for d in inside if cols[self._state.row_of[d]] == collection]
        if where is None:
            return self.ids
        if callable(where):  # run on every document of a filtered query: a predicate reads, it does not keep
            return [self._state.ids[r] for r in range(len(self)) if where(self._doc(r, deep=False))]
        if isinstance(where, (str, bytes)) or not isinstance(where, Iterable):
            raise InvalidTypeError(f"where must be a predicate on MemoryDocument or a collection of ids, got "
                                   f"{type(where).__name__}; for one id pass [{where!r}]")
        wanted = list(where)
        bad = [w for w in wanted if not isinstance(w, str)]
        if bad:
            raise InvalidTypeError(f"ids in where must be str, got {bad[:3]!r}")
        rows = sorted({r for d in wanted for r in self._state.rows_for(d)})
        return [self._state.ids[r] for r in rows]


__all__ = ["MemoryDocument", "RoutedDocument", "QueryResult", "GenerationResult", "Stream", "Snapshot", "Where"]
