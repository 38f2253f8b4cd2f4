"""Ingestion: texts -> memory documents (validate, name, tokenize, split) -> encoded chunk memory.

The bank never touches the tokenizer or the encoder: the engine injects them here as plain callables,
so the bank can be tested, and the model swapped, without either knowing the other.

A text longer than `max_doc_tokens` (the model's window unless configured) becomes several memory
documents `<id>#<part>` (part = 0, 1, ...), each cut on a token boundary; a part's text is its exact piece
of the original (never a cut through a character), so the parts join to the text given. The
parts keep their parent id in `PreparedDocument.parent` (which the bank stores in a column of its own,
never read back from metadata) and, for the reader's convenience, in their metadata as `parent_id` /
`part`. Ids may not contain '#', so a user id can never be taken for a part.
"""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass
from typing import Callable, Container, Optional

from ..errors import DuplicateIdError, InputTooLongError, InvalidArgumentError
from ..types import PART_KEYS
from ..validation import check_ids, check_metadata, check_texts

CONTEXT_TOKENS = 4  # left context a part's piece is decoded after (see Ingestor._piece_end)
MAX_CUT_BACKOFF = 8  # tokens a part's cut may move back to land between characters (a character is <= 4 bytes)


@dataclass(frozen=True)
class PreparedDocument:
    """One memory document, ready to encode."""
    id: str
    text: str
    metadata: dict
    tokens: list  # token ids (no special tokens), 1 <= len <= max_doc_tokens
    parent: Optional[str] = None  # the caller's id when this is a part of a split long text
    collection: str = "default"  # the collection it belongs to


@dataclass(frozen=True)
class Prepared:
    ids: list  # one id per input text, in order: what add/upsert return
    documents: list  # PreparedDocument: the memory documents (a split text gives several)


class Ingestor:
    """Turns texts into memory documents and encoded chunk memory with injected model functions.

    tokenize(text) -> token ids (no special tokens); detokenize(token ids) -> text;
    encode(token_lists, progress) -> one EncodedDocument per token list (keys_r, keys, values
    [L, C, G*D], inputs [L, C, hidden] or None, n_tokens).
    """

    def __init__(self, tokenize: Callable, detokenize: Callable, encode: Callable, max_doc_tokens: int,
                 split_long: bool = True):
        if int(max_doc_tokens) < 1:
            raise InvalidArgumentError(f"max_doc_tokens must be >= 1, got {max_doc_tokens}")
        self.tokenize = tokenize
        self.detokenize = detokenize
        self._encode = encode
        self.max_doc_tokens = int(max_doc_tokens)
        self.split_long = bool(split_long)

    def prepare(self, texts, ids=None, metadata=None, taken_ids: Container = (), collection: str = "default") -> Prepared:
        """Validate the inputs and build the memory documents; nothing is encoded yet.

        `taken_ids`: ids the memory already holds (a DuplicateIdError names the first one given again).
        Raises InvalidTypeError / InvalidArgumentError / DuplicateIdError / InputTooLongError naming the input.
        """
        texts = check_texts(texts)
        metadata = check_metadata(metadata, len(texts))
        ids = [uuid.uuid4().hex for _ in texts] if ids is None else check_ids(ids, len(texts))
        for d in ids:
            if d in taken_ids:
                raise DuplicateIdError(f"id {d!r} is already in the memory; delete it first, use another id, "
                                       "or upsert to replace it")
        documents = []
        for doc_id, text, meta in zip(ids, texts, metadata):
            toks = list(self.tokenize(text))
            if not toks:
                raise InvalidArgumentError(f"document {doc_id!r} tokenizes to nothing; give it some text")
            if len(toks) <= self.max_doc_tokens:
                documents.append(PreparedDocument(doc_id, text, meta, toks, collection=collection))
                continue
            documents.extend(self._split(doc_id, text, toks, meta, collection))
        return Prepared(ids, documents)

    def _split(self, doc_id: str, text: str, toks: list, meta: dict, collection: str = "default") -> list:
        """A text over the window -> parts `<id>#<p>` of at most max_doc_tokens tokens: never silently cut.
        The parts' texts put together are the text itself (see `_part_starts`)."""
        n, w = len(toks), self.max_doc_tokens
        if not self.split_long:
            raise InputTooLongError(f"document {doc_id!r} has {n} tokens, more than the window of {w}; split it "
                                    "or enable split_long_documents")
        taken = [k for k in PART_KEYS if k in meta]
        if taken:  # the parts' own keys would overwrite the caller's, and readers strip them from the whole
            raise InvalidArgumentError(f"document {doc_id!r} is longer than the window ({n} > {w} tokens), so it is "
                                       f"stored in parts that carry metadata {list(PART_KEYS)}; its metadata already "
                                       f"has {taken}: rename those keys, or split the text yourself")
        starts, chars = self._part_starts(text, toks)
        n_parts = len(starts) - 1
        # A UserWarning (not only a log line): the caller asked for one document and gets several ids.
        warnings.warn(f"document {doc_id!r} has {n} tokens > window {w}: stored as {n_parts} memory documents "
                      f"{doc_id}#0..{n_parts - 1} with parent_id {doc_id!r}", stacklevel=5)
        parts = []
        for p in range(n_parts):
            part = toks[starts[p]:starts[p + 1]]
            part_text = text[chars[p]:chars[p + 1]] if chars else self.detokenize(part)
            parts.append(PreparedDocument(f"{doc_id}#{p}", part_text, {**meta, "parent_id": doc_id, "part": p},
                                          part, parent=doc_id, collection=collection))
        return parts

    def _part_starts(self, text: str, toks: list) -> tuple:
        """(token offsets where the parts start, then n; the matching character offsets in `text`, or [] when the
        tokenizer does not give the text back). Each part has at most max_doc_tokens tokens. A cut that would
        fall inside a character (a multi-byte one spread over several byte-level tokens, whose halves decode to
        U+FFFD) moves back to a token where the decoded prefix is a prefix of the text, so every part is an
        exact piece of the text and the pieces join to it."""
        n, w = len(toks), self.max_doc_tokens
        exact = self.detokenize(toks) == text  # byte-level BPE (Llama 3, Qwen, SmolLM) gives text back exactly
        starts, chars = [0], [0]
        while n - starts[-1] > w:
            cut = starts[-1] + w
            if exact:
                for c in range(cut, max(starts[-1], cut - MAX_CUT_BACKOFF), -1):
                    end = self._piece_end(text, toks, starts[-1], chars[-1], c)
                    if end is not None:
                        cut = c
                        chars.append(end)
                        break
                else:  # no clean boundary near the cut: cut by tokens (parts decoded one by one)
                    exact = False
            starts.append(cut)
        starts.append(n)
        return starts, (chars + [len(text)] if exact else [])

    def _piece_end(self, text: str, toks: list, start: int, char_start: int, cut: int) -> Optional[int]:
        """Where in `text` the tokens start:cut end, when they decode to exactly the text from `char_start`
        (`start` is a clean boundary at `char_start`); None when the cut falls inside a character.

        Only the piece is decoded, after a few tokens of left context (a SentencePiece decoder drops the
        leading space of a text's first token; with context the piece keeps it): decoding the whole prefix at
        every cut made splitting quadratic in the text's length."""
        left = max(0, start - CONTEXT_TOKENS)
        head, whole = self.detokenize(toks[left:start]), self.detokenize(toks[left:cut])
        if not whole.startswith(head):
            return None
        piece = whole[len(head):]
        return char_start + len(piece) if text.startswith(piece, char_start) else None

    def encode(self, prepared: Prepared, progress: bool = True) -> list:
        """The memory documents' encodings (EncodedDocument), in order."""
        if not prepared.documents:
            return []
        encoded = self._encode([d.tokens for d in prepared.documents], progress)
        if len(encoded) != len(prepared.documents):
            raise RuntimeError(f"the encoder returned {len(encoded)} encodings for {len(prepared.documents)} documents")
        return list(encoded)
