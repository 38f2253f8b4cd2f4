"""A BM25 index over the memory's texts, kept with the memory (hybrid and lexical routing).

The index is part of the memory's immutable state (`BankState.lexical`): every add, upsert and delete
builds a new `LexicalIndex` from the old one (only the new documents are tokenized) in the same state
swap as the keys, and `storage` saves it in the same generation as the keys (the tensors file, under
its checksum). It depends only on the texts and on this module's tokenizer, never on the model, so the
memory's fingerprint does not include it; `TOKENIZER_VERSION` is recorded in the manifest instead, and a
memory saved under another version (or before the index existed) is re-indexed from its texts on load.

Scoring is Lucene's BM25 (the `bm25s` default, method "lucene"):
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    score(q, d) = sum over the distinct terms t of q of idf(t) * tf(t, d)
                  / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
(Lucene 8+ dropped the classic (k1 + 1) numerator factor: it scales every score alike.)
with N, df and avgdl over the whole memory (a filter restricts which documents may be ranked, not the
statistics, as in Lucene/Elasticsearch filters). Tokens: lower-cased `\\w\\w+` runs minus Lucene's 33
English stopwords (bm25s' `stopwords="en"`).

Layout (per state, N rows, V terms):
    vocab      term -> id, shared append-only by the states of one lineage (a state sees ids < n_terms)
    row_terms  per row: int64 [n_distinct] sorted term ids;  row_tf: per row int64 [n_distinct] counts
    df         int64 [V] rows holding each term;              doc_len: int64 [N] tokens per row
Postings (term -> rows) are built on the first query of a state and cached (the state never changes).
"""

from __future__ import annotations

import re
import threading
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

TOKENIZER_VERSION = "bm25-lucene-en-v1"  # recorded in the manifest: a change re-indexes saved memories on load
K1, B = 1.5, 0.75
TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")
STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not",
    "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was",
    "will", "with"))


def tokenize(text: str) -> list:
    """The index's terms of `text`, in order (with repeats)."""
    return [t for t in TOKEN_RE.findall(text.lower()) if t not in STOPWORDS]


class LexicalIndex:
    """BM25 statistics of a memory's rows; immutable (every change returns a new index)."""

    def __init__(self, vocab: Optional[dict] = None, n_terms: int = 0, row_terms: tuple = (), row_tf: tuple = (),
                 df: Optional[np.ndarray] = None):
        self.vocab = vocab if vocab is not None else {}
        self.n_terms = n_terms
        self.row_terms = row_terms
        self.row_tf = row_tf
        self.df = df if df is not None else np.zeros(0, dtype=np.int64)
        self.doc_len = np.array([int(tf.sum()) for tf in row_tf], dtype=np.int64)
        self._postings = None
        self._postings_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.row_terms)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, texts: Iterable[str]) -> "LexicalIndex":
        return cls().appended(texts)

    def appended(self, texts: Iterable[str]) -> "LexicalIndex":
        """This index with rows for `texts` added at the end. New terms are appended to the shared vocab
        (under the bank's writer lock): older states ignore ids >= their n_terms."""
        vocab, n_terms = self.vocab, self.n_terms
        if len(vocab) != n_terms:  # another branch of this lineage grew the vocab: start a private copy
            vocab = {t: i for t, i in vocab.items() if i < n_terms}
        new_terms, new_tf = [], []
        for text in texts:
            counts: dict = {}
            for tok in tokenize(text):
                tid = vocab.get(tok)
                if tid is None:
                    tid = vocab[tok] = len(vocab)
                counts[tid] = counts.get(tid, 0) + 1
            ids = np.fromiter(sorted(counts), dtype=np.int64, count=len(counts))
            new_terms.append(ids)
            new_tf.append(np.array([counts[int(i)] for i in ids], dtype=np.int64))
        df = np.zeros(len(vocab), dtype=np.int64)
        df[:len(self.df)] = self.df
        for ids in new_terms:
            df[ids] += 1
        return LexicalIndex(vocab, len(vocab), self.row_terms + tuple(new_terms), self.row_tf + tuple(new_tf), df)

    def selected(self, rows: Sequence[int]) -> "LexicalIndex":
        """The index of `rows` only (kept in order), as the bank's row selection (delete, upsert)."""
        df = self.df.copy()
        kept = set(rows)
        for r in range(len(self)):
            if r not in kept:
                df[self.row_terms[r]] -= 1
        return LexicalIndex(self.vocab, self.n_terms, tuple(self.row_terms[r] for r in rows),
                            tuple(self.row_tf[r] for r in rows), df)

    # ------------------------------------------------------------------ scoring
    def _get_postings(self):
        """(order, starts): the rows of term t are row_of_posting[order[starts[t]:starts[t+1]]]; built once."""
        with self._postings_lock:
            if self._postings is None:
                n = len(self)
                terms = np.concatenate(self.row_terms) if n else np.zeros(0, dtype=np.int64)
                tf = np.concatenate(self.row_tf) if n else np.zeros(0, dtype=np.int64)
                rows = np.repeat(np.arange(n, dtype=np.int64), [len(t) for t in self.row_terms])
                order = np.argsort(terms, kind="stable")  # rows ascending within a term
                starts = np.zeros(self.n_terms + 1, dtype=np.int64)
                np.cumsum(np.bincount(terms, minlength=self.n_terms), out=starts[1:])
                self._postings = (rows[order], tf[order].astype(np.float64), starts)
            return self._postings

    def query_terms(self, question: str) -> list:
        """Distinct term ids of `question` known to this index, in first-seen order."""
        ids = []
        for tok in tokenize(question):
            tid = self.vocab.get(tok)
            if tid is not None and tid < self.n_terms and tid not in ids:
                ids.append(tid)
        return ids

    def scores(self, question: str) -> torch.Tensor:
        """BM25 score of every row for `question`: float32 [N] (0 for rows sharing no term)."""
        n = len(self)
        out = np.zeros(n, dtype=np.float64)
        terms = self.query_terms(question)
        if n == 0 or not terms:
            return torch.from_numpy(out.astype(np.float32))
        rows, tf, starts = self._get_postings()
        avgdl = max(float(self.doc_len.mean()), 1e-9)
        norm = K1 * (1.0 - B + B * self.doc_len / avgdl)  # [N]
        for t in terms:
            df = int(self.df[t])
            if df == 0:
                continue
            idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
            r, f = rows[starts[t]:starts[t + 1]], tf[starts[t]:starts[t + 1]]
            out[r] += idf * f / (f + norm[r])
        return torch.from_numpy(out.astype(np.float32))

    # ------------------------------------------------------------------ storage
    def compacted(self) -> "LexicalIndex":
        """The same index over the terms its rows hold (df > 0), renumbered in the same order: the shared vocab
        only grows, so it still holds the words of deleted documents, which a save must not write. Scores are
        unchanged (a term no row holds scores nothing either way)."""
        live = np.flatnonzero(self.df[:self.n_terms] > 0)  # [V'] old ids, ascending
        if len(live) == self.n_terms:
            return self
        new_id = np.full(self.n_terms, -1, dtype=np.int64)
        new_id[live] = np.arange(len(live), dtype=np.int64)  # monotone: each row's term ids stay sorted
        words = {i: t for t, i in self.vocab.items() if i < self.n_terms}
        vocab = {words[int(i)]: n for n, i in enumerate(live)}
        return LexicalIndex(vocab, len(live), tuple(new_id[t] for t in self.row_terms), self.row_tf,
                            self.df[live].copy())

    def to_tensors(self) -> dict:
        """The index as flat tensors for the memory's tensors file (no pickle): CSR rows of (term, tf) and
        the vocabulary as UTF-8 bytes with offsets (a term is `\\w\\w+`, so it holds no separator issue).
        Call it on `compacted()`: it writes every term of the vocab, live or not."""
        words = [None] * self.n_terms
        for t, i in self.vocab.items():
            if i < self.n_terms:
                words[i] = t
        encoded = [w.encode("utf-8") for w in words]
        lens = np.array([len(w) for w in encoded], dtype=np.int64)
        row_lens = np.array([len(t) for t in self.row_terms], dtype=np.int64)
        cat = (lambda parts: torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long))
        return {"lex_row_offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(row_lens)]).astype(np.int64)),
                "lex_terms": cat(self.row_terms), "lex_tf": cat(self.row_tf),
                "lex_vocab_offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)),
                "lex_vocab": torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy())}

    @classmethod
    def from_tensors(cls, t: dict, n_rows: int) -> "LexicalIndex":
        """Rebuild from `to_tensors` output; raises ValueError naming what is inconsistent (the caller turns
        it into a MemoryFormatError naming the file)."""
        names = ("lex_row_offsets", "lex_terms", "lex_tf", "lex_vocab_offsets", "lex_vocab")
        missing = [n for n in names if n not in t]
        if missing:
            raise ValueError(f"lacks the lexical index tensors {missing}")
        ro, terms, tf = (t[n].numpy() for n in names[:3])
        vo, raw = t["lex_vocab_offsets"].numpy(), t["lex_vocab"].numpy()
        if any(t[n].dim() != 1 for n in names) or ro.dtype != np.int64 or terms.dtype != np.int64 \
                or tf.dtype != np.int64 or vo.dtype != np.int64 or raw.dtype != np.uint8:
            raise ValueError("the lexical index tensors have the wrong dtypes or shapes")
        if len(ro) != n_rows + 1 or ro[0] != 0 or ro[-1] != len(terms) or len(tf) != len(terms) \
                or (n_rows and np.any(np.diff(ro) < 0)):
            raise ValueError("the lexical index's row offsets do not match the documents")
        V = len(vo) - 1
        if V < 0 or vo[0] != 0 or vo[-1] != len(raw) or (V and np.any(np.diff(vo) < 1)):
            raise ValueError("the lexical index's vocabulary offsets are damaged")
        if len(terms) and (terms.min() < 0 or terms.max() >= V or tf.min() < 1):
            raise ValueError("the lexical index holds term ids outside its vocabulary or non-positive counts")
        try:
            words = [raw[vo[i]:vo[i + 1]].tobytes().decode("utf-8") for i in range(V)]
        except UnicodeDecodeError:
            raise ValueError("the lexical index's vocabulary is not UTF-8") from None
        vocab = {w: i for i, w in enumerate(words)}
        if len(vocab) != V:
            raise ValueError("the lexical index's vocabulary holds a term twice")
        row_terms = tuple(terms[ro[r]:ro[r + 1]].copy() for r in range(n_rows))
        row_tf = tuple(tf[ro[r]:ro[r + 1]].copy() for r in range(n_rows))
        if any(len(x) > 1 and np.any(np.diff(x) <= 0) for x in row_terms):
            raise ValueError("the lexical index's rows are not sorted by term")
        df = np.bincount(terms, minlength=V).astype(np.int64) if len(terms) else np.zeros(V, dtype=np.int64)
        return cls(vocab, V, row_terms, row_tf, df)

    def equals(self, other: "LexicalIndex") -> bool:
        """Same rows and statistics, by term (term ids may differ between lineages)."""
        if len(self) != len(other):
            return False
        words_a = {i: w for w, i in self.vocab.items() if i < self.n_terms}
        words_b = {i: w for w, i in other.vocab.items() if i < other.n_terms}
        for r in range(len(self)):
            a = {words_a[int(t)]: int(f) for t, f in zip(self.row_terms[r], self.row_tf[r])}
            b = {words_b[int(t)]: int(f) for t, f in zip(other.row_terms[r], other.row_tf[r])}
            if a != b:
                return False
        df_a = {words_a[i]: int(d) for i, d in enumerate(self.df) if d}
        df_b = {words_b[i]: int(d) for i, d in enumerate(other.df) if d}
        return df_a == df_b
