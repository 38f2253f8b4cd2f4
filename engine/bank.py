"""MemoryBank: the compressed latent memory of a document collection, as immutable snapshots.

Layout (the MSA paper): per routing layer, contiguous over all layers,
    keys_r  [L, C, G*D]   routing keys K̄_R (unit-normalised per head for cosine routing); optionally int8
    keys_r_scale [L, C, G] per (chunk, KV head) scale of int8 routing keys (half the bytes routing reads)
    inputs  [L, C, hidden] pooled normalised layer inputs (optional: lets a new router re-key the bank)
    chunk_doc [C] int64   document row of each chunk, on the routing keys' device (routing reads it there)
    doc_start [N+1] int64 first chunk of each row (CSR offsets, host): rows are contiguous runs of chunks
    keys    [L, C', G*D]  content keys K̄ (post-RoPE, document-local positions)
    values  [L, C', G*D]  content values V̄
    content_start [N+1]   first content chunk of each row; None when content and routing chunks are the
                          same (P_R = P, the paper's layout). A routing chunk pools P_R tokens, a content
                          chunk P (`MSAConfig.routing_chunk_size`), so C' differs from C when P_R != P.
A document is the unit of routing, add, delete and metadata; a (routing) chunk is the unit of scoring.
The state also holds the BM25 index of the texts (`lexical.py`, hybrid routing) and the abstention
calibration (a score threshold learned on a dev split; reset when the memory is re-keyed).

Concurrency: the contents are an immutable `BankState`; add/upsert/delete/rekey build a new state under
the bank's one lock and swap it in with one assignment, so a reader that took a snapshot never sees a
half-added document. Ingestion (tokenize, split, encode) is the injected `Ingestor`; files are `storage`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from ..errors import (DocumentNotFoundError, DuplicateIdError, InvalidArgumentError, MemoryFormatError,
                      ModelMismatchError)
from ..kernels.routing import quantize_keys_int8
from ..types import MemoryDocument
from ..validation import check_ids, check_texts
from . import storage
from .ingest import Ingestor
from .lexical import TOKENIZER_VERSION, LexicalIndex

_TENSOR_FIELDS = ("keys_r", "keys_r_scale", "keys", "values", "inputs")


class Keep:
    """What `MemoryBank.reverting` yields: `keep()` makes the block's writes stay even if it then raises."""

    def __init__(self):
        self.kept = False

    def keep(self) -> None:
        self.kept = True


@dataclass(frozen=True)
class BankState:
    ids: tuple = ()
    texts: tuple = ()
    metadata: tuple = ()
    n_tokens: tuple = ()
    parents: tuple = ()  # per row: the caller's id when the row is a part of a split long text, else None
    collections: tuple = ()  # per row: the collection the document belongs to
    doc_start: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))  # [N+1]
    chunk_doc: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [C]
    keys_r: Optional[torch.Tensor] = None  # [L, C, G*D]
    keys_r_scale: Optional[torch.Tensor] = None  # [L, C, G] when keys_r is int8
    keys: Optional[torch.Tensor] = None  # [L, C', G*D]
    values: Optional[torch.Tensor] = None
    inputs: Optional[torch.Tensor] = None  # [L, C, hidden]
    content_start: Optional[torch.Tensor] = None  # [N+1] content chunk offsets; None: equal to doc_start
    row_of: dict = field(default_factory=dict)  # id -> row
    parts: dict = field(default_factory=dict)  # parent id of a split long text -> its rows, in order
    collection_counts: dict = field(default_factory=dict)  # collection -> number of rows
    lexical: LexicalIndex = field(default_factory=LexicalIndex)  # BM25 index of `texts`, row for row
    calibration: Optional[dict] = None  # abstention threshold for this memory and router (see calibrate)
    # the fingerprint of the router that made keys_r: a snapshot taken before `set_router` is routed with its
    # own router's queries, never the new router's against the old keys
    key_mode: Optional[str] = None

    def __len__(self):
        return len(self.ids)

    def __contains__(self, doc_id) -> bool:
        return isinstance(doc_id, str) and (doc_id in self.row_of or doc_id in self.parts)

    def rows_for(self, doc_id) -> list:
        """The rows of `doc_id`: its own row, or the parts of a long text stored as `<id>#<part>`."""
        row = self.row_of.get(doc_id)
        return [row] if row is not None else list(self.parts.get(doc_id, ()))

    @property
    def n_chunks(self) -> int:
        return int(self.chunk_doc.shape[0])

    def chunk_range(self, row: int):
        """The routing chunks of `row`."""
        return int(self.doc_start[row]), int(self.doc_start[row + 1])

    def content_range(self, row: int):
        """The content (K̄, V̄) chunks of `row`."""
        starts = self.doc_start if self.content_start is None else self.content_start
        return int(starts[row]), int(starts[row + 1])


def _index(ids, parents, collections) -> dict:
    """row_of, parts and collection counts, from the stored columns (never from metadata, which the
    caller controls)."""
    parts, counts = {}, {}
    for r, p in enumerate(parents):
        if p is not None:
            parts.setdefault(p, []).append(r)
    for c in collections:
        counts[c] = counts.get(c, 0) + 1
    return {"row_of": {d: i for i, d in enumerate(ids)}, "parts": {k: tuple(v) for k, v in parts.items()},
            "collection_counts": counts}


def _collection_of(s: BankState, doc_id: str) -> Optional[str]:
    rows = s.rows_for(doc_id)
    return s.collections[rows[0]] if rows else None


def nbytes_of(s: BankState) -> int:
    """Bytes of a state's chunk tensors (keys, values, routing keys, kept inputs)."""
    return sum(t.numel() * t.element_size() for t in (getattr(s, n) for n in _TENSOR_FIELDS) if t is not None)


class MemoryBank:
    """A document collection held as chunk-pooled latent memory of one model (and one router).

    ingestor: tokenize/split/encode (see ingest.py). fingerprint: what a saved memory must match to be
    loaded (model, tokenizer, router, chunk size, ...). routing_device: where routing keys and chunk_doc
    live (where routing runs). content_device: where content K̄/V̄ live; "cpu" keeps them in (pinned)
    host memory and memory-mapped after a load (MSA section 7 tiers). int8_routing_keys: quantise
    routing keys per (chunk, KV head); needs n_kv_heads.
    """

    def __init__(self, ingestor: Ingestor, fingerprint: dict, routing_device=None, content_device=None,
                 int8_routing_keys: bool = False, n_kv_heads: Optional[int] = None):
        if int8_routing_keys and not n_kv_heads:
            raise InvalidArgumentError("int8 routing keys need n_kv_heads (one scale per chunk and KV head)")
        self.ingestor = ingestor
        self.fingerprint = dict(fingerprint)
        self.routing_device = routing_device
        self.content_device = content_device
        self.int8_routing_keys = int8_routing_keys
        self.n_kv_heads = n_kv_heads
        self._state = BankState()
        self._lock = threading.RLock()  # the one lock: writers to this bank (readers take snapshots)
        self._reverting = 0  # depth of reverting() blocks open (on the thread holding the lock)
        # (real folder, manifest generation) the state last equalled: its last load or save there
        self.synced: Optional[tuple] = None

    # ------------------------------------------------------------------ reading
    @property
    def state(self) -> BankState:
        return self._state  # an immutable snapshot: safe to use while others add/delete

    def __len__(self):
        return len(self._state)

    def __contains__(self, doc_id):
        return doc_id in self._state

    @property
    def ids(self) -> list:
        return list(self._state.ids)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self._state)

    nbytes_of = staticmethod(nbytes_of)

    @property
    def n_tokens(self) -> int:
        return sum(self._state.n_tokens)

    @property
    def keeps_inputs(self) -> Optional[bool]:
        """Whether the memory holds pooled layer inputs (re-keyable); None when it is empty (it does not say)."""
        s = self._state
        return None if not len(s) else s.inputs is not None

    @staticmethod
    def pooled_inputs(state: BankState) -> torch.Tensor:
        """The kept pooled layer inputs [L, C, hidden] of a state: what a new router trains on and re-keys
        from (router adaptation reads them instead of re-encoding the documents)."""
        if state.inputs is None and len(state):
            raise ModelMismatchError("this memory was built without keep_inputs, so it holds no pooled layer inputs "
                                     "to train or re-key a router from; rebuild it with keep_inputs=True")
        return state.inputs

    def get(self, ids) -> list:
        """MemoryDocuments by id, in the order asked; a split long text's id gives its parts, in order."""
        s = self._state
        ids = [ids] if isinstance(ids, str) else list(ids)
        missing = [d for d in ids if d not in s]
        if missing:
            raise DocumentNotFoundError(f"unknown document id(s) {missing[:5]}; the memory holds {len(s)} documents")
        return [MemoryDocument(s.ids[r], s.texts[r], copy.deepcopy(s.metadata[r]), s.n_tokens[r], s.collections[r])
                for d in ids for r in s.rows_for(d)]

    # ------------------------------------------------------------------ writing
    def add(self, texts, ids=None, metadata=None, progress: bool = True, collection: str = "default") -> list:
        """Encode and add documents; returns their ids (one per text). An id the memory holds raises
        DuplicateIdError. On any error the bank is left unchanged; `add([])` returns [] and changes nothing.

        A text longer than the window becomes several memory documents `<id>#<part>` (with a warning: never
        silently cut); the parent id still names the whole text for get, delete, upsert and `in`."""
        with self._lock:
            base = self._state
            prepared = self.ingestor.prepare(texts, ids, metadata, taken_ids=base, collection=collection)
            if prepared.documents:
                encoded = self.ingestor.encode(prepared, progress)
                self._state = self._appended(base, prepared.documents, encoded)  # one swap: all of it or none
        return prepared.ids

    def upsert(self, texts, ids, metadata=None, progress: bool = True, collection: str = "default") -> list:
        """Replace the documents whose ids exist and add the others, in one state swap: a concurrent reader
        sees the old version or the new one, never neither. On any error the bank is unchanged."""
        if ids is None:
            raise InvalidArgumentError("upsert needs the ids of the documents to replace or add; use add to "
                                       "add documents with generated ids")
        texts = check_texts(texts)  # once: a generator is used up by the first look
        ids = check_ids(ids, len(texts))
        with self._lock:
            s = self._state
            elsewhere = [(d, _collection_of(s, d)) for d in ids if d in s and _collection_of(s, d) != collection]
            if elsewhere:
                d, other = elsewhere[0]
                raise DuplicateIdError(f"id {d!r} belongs to collection {other!r}, not {collection!r}; ids are unique "
                                       "across the memory: use another id, or upsert in that collection")
            gone = {r for d in ids for r in s.rows_for(d)}
            base = _select_rows(s, [r for r in range(len(s)) if r not in gone]) if gone else s
            prepared = self.ingestor.prepare(texts, ids, metadata, taken_ids=base, collection=collection)
            encoded = self.ingestor.encode(prepared, progress)
            new = self._appended(base, prepared.documents, encoded) if prepared.documents else base
            self._state = new
        return prepared.ids

    replace = upsert  # the name before the facade

    def delete(self, ids, missing_ok: bool = False, collection: Optional[str] = None) -> list:
        """Remove documents (a split long text by its parent id); returns the ids removed, in the order
        given. Unknown ids (or, with `collection`, ids of other collections) raise DocumentNotFoundError and
        nothing is removed, unless `missing_ok`."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        with self._lock:
            s = self._state
            asked = {d for d in ids if isinstance(d, str)}
            for d in ids:  # some parts alone would leave their text cut short under the parent id, silently
                row = s.row_of.get(d) if isinstance(d, str) else None
                parent = s.parents[row] if row is not None else None
                if parent is not None and parent not in asked \
                        and not all(s.ids[r] in asked for r in s.parts[parent]):
                    raise InvalidArgumentError(f"{d!r} is one part of the split long text {parent!r}; delete "
                                               f"{parent!r} (or all its parts) to remove the whole text; nothing "
                                               "was deleted")
            if collection is not None:  # a document of another collection is not this collection's to delete
                s = _select_rows(s, [r for r in range(len(s)) if s.collections[r] == collection])
            missing = [d for d in ids if d not in s]
            if missing and not missing_ok:
                raise DocumentNotFoundError(f"cannot delete unknown document id(s) {missing[:5]}; nothing was "
                                            "deleted (pass missing_ok=True to skip unknown ids)")
            deleted = list(dict.fromkeys(d for d in ids if d in s))
            full = self._state
            drop = {r for d in deleted for r in full.rows_for(d)}
            if drop:
                self._state = _select_rows(full, [r for r in range(len(full)) if r not in drop])
        return deleted

    @contextlib.contextmanager
    def reverting(self):
        """Writes made in the block are undone when it raises: the state goes back to the one it started from.
        The bank's lock is held throughout, so no other writer's change can be undone with them. Yields a
        `Keep`: once `keep()` is called (a save of the block's writes has committed) nothing is undone, so an
        interrupt while the save cleans up cannot leave the memory older than its folder."""
        with self._lock:
            before, kept = self._state, Keep()
            self._reverting += 1
            try:
                yield kept
            except BaseException:
                if not kept.kept:
                    self._state = before
                raise
            finally:
                self._reverting -= 1

    def _not_reverting(self, what: str) -> None:
        """rekey and load also change the settings later adds are keyed with (the router, the fingerprint),
        which reverting() does not put back: refused inside its block rather than half undone."""
        if self._reverting:
            raise InvalidArgumentError(f"{what} inside a saving_to() block could not be undone if the block failed; "
                                       "do it before or after the block")

    def rekey(self, keys_from_inputs: Callable, fingerprint, on_swap: Optional[Callable] = None) -> None:
        """Recompute the routing keys for a new (trained, linear) router from the kept pooled inputs:
        keys_from_inputs(inputs [L, C, hidden]) -> keys_r [L, C, G*D]. Keys are computed first; the state and
        the fingerprint (the engine's, with the new router's key_mode) then change together, and `on_swap()`
        runs under the same lock (the engine swaps its encoder's router there: writers encode under this lock,
        so no document is ever keyed by the old router into the new router's state)."""
        with self._lock:
            self._not_reverting("set_router (re-keying the memory)")
            if callable(fingerprint):  # built under the lock: a concurrent load may have changed the settings
                fingerprint = fingerprint()
            s = self._state
            if s.inputs is None and len(s):
                raise ModelMismatchError("this memory was built without keep_inputs, so it cannot be re-keyed "
                                         "without re-encoding; rebuild it with keep_inputs=True")
            new_state = s
            if len(s):
                keys_r = keys_from_inputs(s.inputs).to(s.keys.dtype)  # [L, C, G*D]
                new_state = replace(s, **self._routing_keys(replace(s, keys_r=None, keys_r_scale=None), [keys_r]))
            # a threshold learned on the old router's scores means nothing for the new one's
            self._state = replace(new_state, calibration=None, key_mode=fingerprint.get("key_mode"))
            self.fingerprint = dict(fingerprint)
            if on_swap is not None:
                on_swap()

    def set_calibration(self, calibration: Optional[dict]) -> None:
        """Store an abstention calibration with the memory (saved in its manifest). Its threshold must be a
        finite float: the manifest is JSON, and a memory whose manifest holds Infinity would not load."""
        if calibration is not None:
            t = calibration.get("threshold") if isinstance(calibration, dict) else None
            if not isinstance(t, float) or not math.isfinite(t):
                raise InvalidArgumentError(f"an abstention calibration needs a finite float 'threshold', got {t!r}")
        with self._lock:
            self._state = replace(self._state, calibration=None if calibration is None else dict(calibration))

    def _appended(self, s: BankState, docs: list, encoded: list) -> BankState:
        if s.n_chunks and (s.inputs is None) != (encoded[0].inputs is None):
            raise ModelMismatchError("this memory and the engine disagree on keep_inputs (pooled layer inputs for "
                                     "re-keying); use the setting the memory was built with")
        counts = torch.tensor([e.keys_r.shape[1] for e in encoded], dtype=torch.long)  # routing chunks per new document
        content_counts = torch.tensor([e.keys.shape[1] for e in encoded], dtype=torch.long)  # content chunks
        first_row = len(s)
        keys = self._routing_keys(s, [e.keys_r for e in encoded])
        new_chunk_doc = torch.repeat_interleave(torch.arange(first_row, first_row + len(docs)), counts)
        ids = s.ids + tuple(d.id for d in docs)
        parents = s.parents + tuple(d.parent for d in docs)
        collections = s.collections + tuple(d.collection for d in docs)

        def cat(old, new_parts, device=None):
            if new_parts[0] is None:
                return None
            new = torch.cat(new_parts, dim=1)
            if device is not None:
                new = new.to(device)
            out = new if old is None else torch.cat([old.to(new.device), new], dim=1)
            return _pin(out) if out.device.type == "cpu" and device is not None else out

        return BankState(
            ids=ids, texts=s.texts + tuple(d.text for d in docs), metadata=s.metadata + tuple(d.metadata for d in docs),
            n_tokens=s.n_tokens + tuple(e.n_tokens for e in encoded), parents=parents, collections=collections,
            doc_start=torch.cat([s.doc_start, s.doc_start[-1] + torch.cumsum(counts, 0)]),
            content_start=_content_start(s, content_counts, counts),
            chunk_doc=torch.cat([s.chunk_doc.to(keys["keys_r"].device), new_chunk_doc.to(keys["keys_r"].device)]),
            **keys,
            keys=cat(s.keys, [e.keys for e in encoded], self.content_device),
            values=cat(s.values, [e.values for e in encoded], self.content_device),
            inputs=cat(s.inputs, [e.inputs for e in encoded], "cpu"),
            lexical=s.lexical.appended(d.text for d in docs), calibration=s.calibration,
            key_mode=self.fingerprint.get("key_mode"), **_index(ids, parents, collections))

    def _routing_keys(self, s: BankState, new_parts: list) -> dict:
        """Append new routing keys [L, c, G*D] to the state's, quantised to int8 when configured."""
        new = torch.cat(new_parts, dim=1).to(self.routing_device or new_parts[0].device)
        scale = None
        if self.int8_routing_keys:
            new, scale = quantize_keys_int8(new.float(), n_kv_heads=self.n_kv_heads)
        if s.keys_r is not None:
            new = torch.cat([s.keys_r.to(new.device), new], dim=1)
            scale = None if scale is None else torch.cat([s.keys_r_scale.to(scale.device), scale], dim=1)
        return {"keys_r": new, "keys_r_scale": scale}

    # ------------------------------------------------------------------ persistence
    def locked(self, directory: str, timeout: float = storage.DEFAULT_LOCK_TIMEOUT):
        """Context manager: hold `directory`'s writer lock (threads and processes) for a read-modify-write:
            with bank.locked(d) as held:
                if held.holds_memory: bank.load(d)
                bank.add(...)
                bank.save(d)
        Waits up to `timeout` s for another writer, then MemoryLockedError. Refuses a non-empty folder that
        is not a memory (InvalidArgumentError) before anything is written."""
        return storage.folder_lock(directory, timeout=timeout)

    def save(self, directory: str, lock: Optional[storage.FolderLock] = None,
             timeout: float = storage.DEFAULT_LOCK_TIMEOUT, on_commit: Optional[Callable] = None) -> None:
        """Atomically write the bank to `directory` under its writer lock (see storage.py). The previous
        copy stays loadable until the new manifest is in place; only the memory's own files are removed.
        `on_commit()` runs as soon as the new manifest is in place (before the previous files are removed)."""
        # The folder lock first, then the state: one lock order everywhere (a read-modify-write holds the
        # folder while it adds), and the state written is the newest one when the write starts.
        with storage.folder_lock(directory, timeout=timeout) as held:
            with self._lock:  # the saved state and fingerprint belong together
                s, fingerprint = self._state, dict(self.fingerprint)
            tensors = {"doc_start": s.doc_start, "chunk_doc": s.chunk_doc}
            if s.content_start is not None:
                tensors["content_start"] = s.content_start
            tensors.update({n: getattr(s, n) for n in _TENSOR_FIELDS if getattr(s, n) is not None})
            lexical = s.lexical.compacted()  # no word of a deleted document is written
            tensors.update(lexical.to_tensors())  # same file, same checksum, same generation
            docs = [{"id": s.ids[r], "text": s.texts[r], "metadata": s.metadata[r], "n_tokens": s.n_tokens[r],
                     "parent": s.parents[r], "collection": s.collections[r]} for r in range(len(s))]
            extra = {"lexical": {"tokenizer": TOKENIZER_VERSION, "n_terms": lexical.n_terms},
                     "calibration": s.calibration}
            manifest = storage.save(held.directory, tensors, docs, fingerprint, lock=lock or held, timeout=timeout,
                                    extra=extra, on_commit=on_commit)
            self.synced = (held.directory, manifest["generation"])

    def changed_since_synced(self, directory: str) -> bool:
        """Has another writer (`msa ingest`, another process or engine) saved to `directory` since this bank last
        loaded or saved it? False when the bank never did, or the folder holds no readable manifest. Call under
        the folder's lock, or the answer may be stale when read."""
        real = os.path.realpath(directory)
        if self.synced is None or self.synced[0] != real:
            return False
        try:
            return storage.read_manifest(real)["generation"] != self.synced[1]
        except MemoryFormatError:
            return False

    def load(self, directory: str, verify: bool = True, fingerprint_for: Optional[Callable] = None,
             on_swap: Optional[Callable] = None) -> None:
        """Replace the bank's contents with a saved memory. The fingerprint is checked before any data file
        is read, and again under the lock at the swap; `verify` also checks the files' sha256 (structure is
        always checked). A failed load changes nothing.

        fingerprint_for(saved fingerprint) -> the fingerprint to check against, which becomes the bank's with
        the new state (an engine adopting a stored setting); `on_swap(saved fingerprint)` runs under the same
        lock, so the state and the settings that key later adds always come from the one manifest read."""
        with self._lock:  # before reading: an RLock, so the same thread's swap below re-enters it
            self._not_reverting("load")
        stored = storage.load(directory, fingerprint_for or self.fingerprint, verify=verify)
        state = self._state_from(stored)
        saved = stored.manifest["fingerprint"]
        with self._lock:  # (a reverting block holds the lock throughout: none can have opened since the check)
            # checked again under the lock: a set_router (re-key) between the first check and this swap would
            # otherwise leave the engine keying later adds with a router the loaded memory was not keyed by
            expected = fingerprint_for(saved) if fingerprint_for is not None else self.fingerprint
            storage.check_fingerprint(stored.manifest, expected, directory)
            self._state = state
            self.synced = (os.path.realpath(directory), stored.manifest["generation"])
            if fingerprint_for is not None:
                provenance = {k: v for k, v in self.fingerprint.items() if k == "router_provenance"}
                self.fingerprint = {**provenance, **expected}
            if on_swap is not None:
                on_swap(saved)

    def _state_from(self, stored: storage.Stored) -> BankState:
        """Routing keys (and chunk_doc) go to the routing device; content K̄/V̄ stays memory-mapped on disk
        unless the content device is an accelerator (the page cache then serves the selected chunks)."""
        t, docs = stored.tensors, stored.docs
        keys_r, keys_r_scale = t.get("keys_r"), t.get("keys_r_scale")
        if keys_r is not None and self.routing_device is not None:
            keys_r = keys_r.to(self.routing_device)
            keys_r_scale = None if keys_r_scale is None else keys_r_scale.to(self.routing_device)
        keys, values = t.get("keys"), t.get("values")
        if keys is not None and self.content_device is not None and torch.device(self.content_device).type != "cpu":
            keys, values = keys.to(self.content_device), values.to(self.content_device)
        chunk_doc = t["chunk_doc"].clone()
        if keys_r is not None:
            chunk_doc = chunk_doc.to(keys_r.device)
        ids = tuple(d["id"] for d in docs)
        parents = tuple(d.get("parent") for d in docs)
        collections = tuple(d.get("collection", "default") for d in docs)
        texts = tuple(d["text"] for d in docs)
        # a memory saved before the index existed, or under another tokenizer version, is re-indexed
        lexical = stored.lexical if stored.lexical is not None else LexicalIndex.build(texts)
        return BankState(ids=ids, texts=texts, metadata=tuple(d["metadata"] for d in docs),
                         n_tokens=tuple(d["n_tokens"] for d in docs), parents=parents, collections=collections,
                         doc_start=t["doc_start"].clone(), chunk_doc=chunk_doc,
                         content_start=t["content_start"].clone() if "content_start" in t else None,
                         keys_r=keys_r, keys_r_scale=keys_r_scale, keys=keys, values=values,
                         inputs=t.get("inputs"), lexical=lexical, calibration=stored.manifest.get("calibration"),
                         key_mode=self.fingerprint.get("key_mode"), **_index(ids, parents, collections))


def _select_rows(s: BankState, rows: list) -> BankState:
    """The state restricted to `rows` (kept in order), chunks renumbered."""
    doc_start, counts, chunk_idx = _offsets_of_rows(s.doc_start, rows)
    content_start, content_idx = None, chunk_idx
    if s.content_start is not None:  # content chunks have their own offsets (P_R != P)
        content_start, _, content_idx = _offsets_of_rows(s.content_start, rows)

    def take(t, idx=chunk_idx):
        return None if t is None else t.index_select(1, idx.to(t.device))

    ids = tuple(s.ids[r] for r in rows)
    parents = tuple(s.parents[r] for r in rows)
    collections = tuple(s.collections[r] for r in rows)
    return BankState(ids=ids, texts=tuple(s.texts[r] for r in rows), metadata=tuple(s.metadata[r] for r in rows),
                     n_tokens=tuple(s.n_tokens[r] for r in rows), parents=parents, collections=collections,
                     doc_start=doc_start,
                     chunk_doc=torch.repeat_interleave(torch.arange(len(rows)), counts).to(s.chunk_doc.device),
                     keys_r=take(s.keys_r), keys_r_scale=take(s.keys_r_scale), keys=take(s.keys, content_idx),
                     values=take(s.values, content_idx), inputs=take(s.inputs), content_start=content_start,
                     lexical=s.lexical.selected(rows),
                     calibration=s.calibration, key_mode=s.key_mode, **_index(ids, parents, collections))


def _offsets_of_rows(starts: torch.Tensor, rows: list) -> tuple:
    """CSR chunk offsets `starts` [N+1] restricted to `rows` (kept in order) -> (new offsets [len(rows)+1],
    chunks per kept row, the kept chunks' old indices)."""
    counts = (starts[1:] - starts[:-1])[torch.tensor(rows, dtype=torch.long)] if rows else torch.zeros(0, dtype=torch.long)
    idx = torch.cat([torch.arange(int(starts[r]), int(starts[r + 1])) for r in rows]) if rows \
        else torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]), counts, idx


def _content_start(s: BankState, content_counts: torch.Tensor, counts: torch.Tensor) -> Optional[torch.Tensor]:
    """The content chunk offsets after appending documents with these content / routing chunk counts: None
    while every document has as many content chunks as routing chunks (P_R = P: doc_start serves both)."""
    if s.content_start is None and torch.equal(content_counts, counts):
        return None
    old = s.doc_start if s.content_start is None else s.content_start
    return torch.cat([old, old[-1] + torch.cumsum(content_counts, 0)])


def _pin(t: torch.Tensor) -> torch.Tensor:
    """Page-locked host memory makes host->device copies of selected chunks asynchronous (CUDA only)."""
    if torch.cuda.is_available() and not t.is_pinned():
        return t.pin_memory()
    return t
