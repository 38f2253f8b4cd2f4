"""MemoryBank: the compressed latent memory of a document collection, and its storage.

Layout (DESIGN.md): per routing layer, contiguous over all layers,
    keys_r  [L, C, G*D]   routing keys K̄_R (unit-normalised per head for cosine routing); optionally int8
    keys_r_scale [L, C, G] per (chunk, KV head) scale of int8 routing keys (half the bytes routing reads)
    keys    [L, C, G*D]   content keys K̄ (post-RoPE, document-local positions)
    values  [L, C, G*D]   content values V̄
    inputs  [L, C, hidden] pooled normalised layer inputs (optional: lets a new router re-key the bank)
    chunk_doc [C] int64   document row of each chunk; rows are contiguous runs (CSR `doc_start` [N+1])
A document is the unit of routing, add, delete and metadata; a chunk is the unit of scoring.

Concurrency: the bank's contents are an immutable `BankState`; add/delete build a new state and swap it
in under a lock, so a query that took a snapshot never sees a half-added document.

Storage: a folder with `manifest.json` (format version, model fingerprint, counts, file names and
checksums), `tensors-<gen>.safetensors` and `docs-<gen>.jsonl`. A save writes new generation files,
then atomically replaces the manifest, then removes the old generation: a crash at any point leaves a
manifest that names complete files. Load parses safetensors headers itself and memory-maps the data
(never unpickles).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch

from ..kernels.routing import quantize_keys_int8

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class MemoryFormatError(ValueError):
    """A saved memory folder that cannot be read: missing, truncated, tampered or from another version."""


class ModelMismatchError(ValueError):
    """A memory was built by another model, tokenizer, router or encoding setting than the engine's."""


@dataclass(frozen=True)
class BankState:
    ids: tuple = ()
    texts: tuple = ()
    metadata: tuple = ()
    n_tokens: tuple = ()
    doc_start: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))  # [N+1]
    chunk_doc: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [C]
    keys_r: Optional[torch.Tensor] = None  # [L, C, G*D]
    keys_r_scale: Optional[torch.Tensor] = None  # [L, C, G] when keys_r is int8
    keys: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    inputs: Optional[torch.Tensor] = None  # [L, C, hidden]
    row_of: dict = field(default_factory=dict)  # id -> row
    parts: dict = field(default_factory=dict)  # parent id of a split long document -> its rows

    def __len__(self):
        return len(self.ids)

    def rows_for(self, doc_id) -> list:
        """The rows of `doc_id`: its own row, or the parts of a long document stored as `<id>#<part>`."""
        row = self.row_of.get(doc_id)
        return [row] if row is not None else list(self.parts.get(doc_id, ()))

    @property
    def n_chunks(self) -> int:
        return int(self.chunk_doc.shape[0])

    def chunk_range(self, row: int):
        return int(self.doc_start[row]), int(self.doc_start[row + 1])


@dataclass
class MemoryDocument:
    id: str
    text: str
    metadata: dict
    n_tokens: int


def _index(ids, metadata) -> dict:
    """row_of and parts (parent id -> rows) for a state's documents."""
    parts = {}
    for r, m in enumerate(metadata):
        if "parent_id" in m and ids[r] == f"{m['parent_id']}#{m.get('part')}":
            parts.setdefault(m["parent_id"], []).append(r)
    return {"row_of": {d: i for i, d in enumerate(ids)}, "parts": {k: tuple(v) for k, v in parts.items()}}


def _check_ids(ids, n, existing) -> list:
    if ids is None:
        return [uuid.uuid4().hex for _ in range(n)]
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"got {n} texts but {len(ids)} ids; pass one id per text or none")
    for i, d in enumerate(ids):
        if not isinstance(d, str) or not d:
            raise TypeError(f"id at position {i} is {d!r}; ids must be non-empty strings")
    seen = set()
    for d in ids:
        if d in seen:
            raise ValueError(f"duplicate id {d!r} in this call; ids must be unique")
        seen.add(d)
        if d in existing:
            raise ValueError(f"id {d!r} is already in the memory; delete it first or use another id")
    return ids


def validate_texts(texts) -> list:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a list of strings, not a single string; wrap it: [text]")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text at position {i} is a {type(t).__name__}, not a str; decode or convert it first")
        if not t.strip():
            raise ValueError(f"text at position {i} is empty or whitespace only; memory documents need content")
    return texts


def validate_metadata(metadata, n) -> list:
    if metadata is None:
        return [{} for _ in range(n)]
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(f"got {n} texts but {len(metadata)} metadata entries; pass one dict per text or none")
    out = []
    for i, m in enumerate(metadata):
        if m is None:
            m = {}
        if not isinstance(m, dict):
            raise TypeError(f"metadata at position {i} is a {type(m).__name__}; metadata must be a dict")
        try:
            json.dumps(m)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metadata at position {i} is not JSON-serialisable ({e}); use str/int/float/bool/list/dict")
        out.append(dict(m))
    return out


class MemoryBank:
    """A document collection held as chunk-pooled latent memory of one model (and one router)."""

    def __init__(self, encoder, fingerprint: dict, tokenize, max_doc_tokens: int, split_long: bool = True,
                 routing_device=None, content_device=None, int8_routing_keys: bool = False):
        self.encoder = encoder
        self.fingerprint = dict(fingerprint)
        self.tokenize = tokenize  # text -> list of token ids (no special tokens)
        self.max_doc_tokens = int(max_doc_tokens)
        self.split_long = split_long
        # Tiered memory (MSA section 7): routing keys where routing runs (the accelerator); content K̄/V̄
        # (needed only for the k selected documents) may live in host memory instead, pinned for fast copies.
        self.routing_device = routing_device
        self.content_device = content_device
        self.int8_routing_keys = int8_routing_keys
        self._state = BankState()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ reading
    @property
    def state(self) -> BankState:
        return self._state  # an immutable snapshot: safe to use while others add/delete

    def __len__(self):
        return len(self._state)

    def __contains__(self, doc_id):
        return bool(self._state.rows_for(doc_id))

    @property
    def ids(self) -> list:
        return list(self._state.ids)

    @property
    def nbytes(self) -> int:
        s = self._state
        return sum(t.numel() * t.element_size() for t in (s.keys_r, s.keys_r_scale, s.keys, s.values, s.inputs)
                   if t is not None)

    @property
    def n_tokens(self) -> int:
        return sum(self._state.n_tokens)

    def get(self, ids) -> list:
        s = self._state
        if isinstance(ids, str):
            ids = [ids]
        missing = [d for d in ids if not s.rows_for(d)]
        if missing:
            raise KeyError(f"unknown document id(s) {missing[:5]}; the memory holds {len(s)} documents")
        rows = [r for d in ids for r in s.rows_for(d)]  # a split long document gives its parts, in order
        return [MemoryDocument(s.ids[r], s.texts[r], dict(s.metadata[r]), s.n_tokens[r]) for r in rows]

    # ------------------------------------------------------------------ writing
    def add(self, texts, ids=None, metadata=None, progress: bool = True) -> list:
        """Encode and add documents; returns their ids (one per text). On any error the bank is left
        unchanged.

        A text longer than the model's window becomes several memory documents `<id>#<part>` that keep
        `parent_id` (and `part`) in their metadata, with a warning: never silently cut. The parent id
        still names the whole document for get, delete, replace and `in`.
        """
        with self._lock:
            base = self._state
            new = self._encode_new(base, texts, ids, metadata, progress)
            self._state = self._appended(base, *new[1:])  # one assignment: readers see all of it or none
        return new[0]

    def replace(self, texts, ids, metadata=None, progress: bool = True) -> list:
        """Replace documents whose ids exist and add the others, in one state swap: a concurrent reader
        sees the old version or the new one, never neither. On any error the bank is unchanged."""
        ids = list(ids)
        with self._lock:
            gone = {r for d in ids for r in self._state.rows_for(d)}
            base = _select_rows(self._state, [r for r in range(len(self._state)) if r not in gone])
            new = self._encode_new(base, texts, ids, metadata, progress)
            self._state = self._appended(base, *new[1:])
        return new[0]

    def _encode_new(self, base: BankState, texts, ids, metadata, progress):
        texts = validate_texts(texts)
        metadata = validate_metadata(metadata, len(texts))
        ids = _check_ids(ids, len(texts), base.row_of.keys() | base.parts.keys())
        doc_ids, doc_texts, doc_meta, doc_tokens = [], [], [], []
        for doc_id, text, meta in zip(ids, texts, metadata):
            toks = self.tokenize(text)
            if not toks:
                raise ValueError(f"document {doc_id!r} tokenizes to nothing")
            if len(toks) <= self.max_doc_tokens:
                doc_ids.append(doc_id); doc_texts.append(text); doc_meta.append(meta); doc_tokens.append(toks)
                continue
            if not self.split_long:
                raise ValueError(f"document {doc_id!r} has {len(toks)} tokens, more than the window of "
                                 f"{self.max_doc_tokens}; split it or enable split_long_documents")
            n_parts = (len(toks) + self.max_doc_tokens - 1) // self.max_doc_tokens
            warnings.warn(f"document {doc_id!r} has {len(toks)} tokens > window {self.max_doc_tokens}: "
                          f"stored as {n_parts} memory documents {doc_id}#0..{n_parts - 1} with parent_id")
            for p in range(n_parts):
                part = toks[p * self.max_doc_tokens:(p + 1) * self.max_doc_tokens]
                pid = f"{doc_id}#{p}"
                if pid in base.row_of:
                    raise ValueError(f"id {pid!r} is already in the memory")
                doc_ids.append(pid)
                doc_texts.append(self.tokenizer_decode(part))
                doc_meta.append({**meta, "parent_id": doc_id, "part": p})
                doc_tokens.append(part)
        encoded = self.encoder.encode(doc_tokens, progress=progress)
        return ids, doc_ids, doc_texts, doc_meta, encoded

    def tokenizer_decode(self, toks) -> str:
        return self.encoder.model.tokenizer.decode(toks, skip_special_tokens=True)

    def _appended(self, s: BankState, ids, texts, metas, encoded) -> BankState:
        chunk_counts = [e.keys.shape[1] for e in encoded]
        first_row = len(s)
        new_chunk_doc = torch.repeat_interleave(torch.arange(first_row, first_row + len(ids)),
                                                torch.tensor(chunk_counts, dtype=torch.long))
        new_start = s.doc_start[-1] + torch.cumsum(torch.tensor(chunk_counts, dtype=torch.long), 0)

        def cat(old, new_parts, device=None):
            if new_parts[0] is None:
                return None
            new = torch.cat(new_parts, dim=1)
            if device is not None:
                new = new.to(device)
            out = new if old is None else torch.cat([old.to(new.device), new], dim=1)
            return _pin(out) if out.device.type == "cpu" and device is not None else out

        if s.n_chunks and (s.inputs is None) != (encoded[0].inputs is None):
            raise ModelMismatchError("this memory and the engine disagree on keep_inputs (pooled layer inputs for "
                                     "re-keying); use the setting the memory was built with")
        return BankState(
            ids=s.ids + tuple(ids), texts=s.texts + tuple(texts), metadata=s.metadata + tuple(metas),
            n_tokens=s.n_tokens + tuple(e.n_tokens for e in encoded),
            doc_start=torch.cat([s.doc_start, new_start]), chunk_doc=torch.cat([s.chunk_doc, new_chunk_doc]),
            **self._routing_keys(s, [e.keys_r for e in encoded]),
            keys=cat(s.keys, [e.keys for e in encoded], self.content_device),
            values=cat(s.values, [e.values for e in encoded], self.content_device),
            inputs=cat(s.inputs, [e.inputs for e in encoded], "cpu"),
            **_index(s.ids + tuple(ids), s.metadata + tuple(metas)))

    def _routing_keys(self, s: BankState, new_parts: list) -> dict:
        """Append new routing keys [L, c, G*D] to the state's, quantised to int8 when configured."""
        new = torch.cat(new_parts, dim=1).to(self.routing_device or new_parts[0].device)
        scale = None
        if self.int8_routing_keys:
            new, scale = quantize_keys_int8(new.float(), n_kv_heads=self.encoder.model.n_kv_heads)
        if s.keys_r is not None:
            new = torch.cat([s.keys_r.to(new.device), new], dim=1)
            scale = None if scale is None else torch.cat([s.keys_r_scale.to(scale.device), scale], dim=1)
        return {"keys_r": new, "keys_r_scale": scale}

    def delete(self, ids) -> None:
        """Remove documents; unknown ids raise KeyError and nothing is removed."""
        if isinstance(ids, str):
            ids = [ids]
        with self._lock:
            s = self._state
            missing = [d for d in ids if not s.rows_for(d)]
            if missing:
                raise KeyError(f"cannot delete unknown document id(s) {missing[:5]}; nothing was deleted")
            drop = {r for d in ids for r in s.rows_for(d)}
            keep_rows = [r for r in range(len(s)) if r not in drop]
            self._state = _select_rows(s, keep_rows)

    def rekey(self, router) -> None:
        """Recompute the routing keys for a new (trained, linear) router from the kept pooled inputs.
        Keys are computed first; the state, the encoder's router and the fingerprint then change together."""
        with self._lock:
            s = self._state
            if s.inputs is None and len(s):
                raise ModelMismatchError("this memory was built without keep_inputs, so it cannot be re-keyed "
                                         "without re-encoding; rebuild it with keep_inputs=True")
            new_state = s
            if len(s):
                keys_r = torch.stack([self.encoder.routing_keys_from_inputs(l, s.inputs[i], router)
                                      for i, l in enumerate(self.encoder.routing_layers)]).to(s.keys.dtype)
                new_state = replace(s, **self._routing_keys(replace(s, keys_r=None, keys_r_scale=None), [keys_r]))
            self._state = new_state
            self.encoder.router = router
            self.fingerprint["key_mode"] = router.fingerprint()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str) -> None:
        """Atomically write the bank to `directory` (see module doc). The previous copy stays loadable
        until the new manifest is in place."""
        from safetensors.torch import save_file

        s = self._state
        os.makedirs(directory, exist_ok=True)
        gen = uuid.uuid4().hex[:12]
        tensors_name, docs_name = f"tensors-{gen}.safetensors", f"docs-{gen}.jsonl"
        tensors = {"doc_start": s.doc_start, "chunk_doc": s.chunk_doc}
        for name in ("keys_r", "keys_r_scale", "keys", "values", "inputs"):
            t = getattr(s, name)
            if t is not None:
                tensors[name] = t.detach().to("cpu").contiguous()
        tensors = {k: v.contiguous().clone() if not v.is_contiguous() else v for k, v in tensors.items()}
        tpath = os.path.join(directory, tensors_name)
        save_file(tensors, tpath)
        _fsync(tpath)
        dpath = os.path.join(directory, docs_name)
        with open(dpath, "w", encoding="utf-8") as f:
            for r in range(len(s)):
                f.write(json.dumps({"id": s.ids[r], "text": s.texts[r], "metadata": s.metadata[r],
                                    "n_tokens": s.n_tokens[r]}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "n_documents": len(s), "n_chunks": s.n_chunks, "n_tokens": sum(s.n_tokens),
            "tensors": {"file": tensors_name, "bytes": os.path.getsize(tpath)},
            "documents": {"file": docs_name, "sha256": file_sha256(dpath)},
        }
        tmp = os.path.join(directory, f".{MANIFEST}.{gen}.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, MANIFEST))  # the commit point
        _fsync_dir(directory)
        for name in os.listdir(directory):  # the previous generation, and leftovers of crashed saves
            if name not in (MANIFEST, tensors_name, docs_name) and (
                    name.startswith(("tensors-", "docs-")) or name.startswith(f".{MANIFEST}.")):
                try:
                    os.remove(os.path.join(directory, name))
                except OSError:
                    pass

    def load(self, directory: str) -> None:
        """Replace the bank's contents with a saved memory. Checks the model fingerprint first."""
        manifest = read_manifest(directory)
        fp = manifest["fingerprint"]
        mismatch = [k for k in self.fingerprint if fp.get(k) != self.fingerprint[k]]
        if mismatch:
            details = ", ".join(f"{k}: saved {fp.get(k)!r} vs engine {self.fingerprint[k]!r}" for k in mismatch)
            raise ModelMismatchError(
                f"memory {directory!r} was built with a different model or settings ({details}); load it with the "
                "engine that built it, or re-ingest the documents with this one")
        state = read_state(directory, manifest, self.routing_device, self.content_device)
        if len(state):  # adopt the memory's keep_inputs, so later adds stay consistent with it
            self.encoder.keep_inputs = state.inputs is not None
        self._state = state


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise MemoryFormatError(f"{directory!r} holds no saved memory ({MANIFEST} is missing)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemoryFormatError(f"{path} is truncated or not JSON ({e}); restore the folder from a backup")
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise MemoryFormatError(f"{path} has format version {manifest.get('format_version') if isinstance(manifest, dict) else None!r}; "
                                f"this msa-plugins reads version {FORMAT_VERSION}")
    for key in ("fingerprint", "n_documents", "n_chunks", "tensors", "documents"):
        if key not in manifest:
            raise MemoryFormatError(f"{path} lacks {key!r}: the manifest was edited or damaged")
    return manifest


def read_state(directory: str, manifest: dict, routing_device=None, content_device=None) -> BankState:
    """Load a saved bank. Routing keys go to `routing_device`; content K̄/V̄ stays memory-mapped on disk
    unless `content_device` names an accelerator (the page cache then serves the selected chunks)."""
    tpath = os.path.join(directory, manifest["tensors"]["file"])
    dpath = os.path.join(directory, manifest["documents"]["file"])
    for p in (tpath, dpath):
        if not os.path.isfile(p):
            raise MemoryFormatError(f"{p} named by the manifest is missing")
    if os.path.getsize(tpath) != manifest["tensors"]["bytes"]:
        raise MemoryFormatError(f"{tpath} has {os.path.getsize(tpath)} bytes, the manifest says "
                                f"{manifest['tensors']['bytes']}: the file is truncated or was replaced")
    if file_sha256(dpath) != manifest["documents"]["sha256"]:
        raise MemoryFormatError(f"{dpath} does not match its checksum in the manifest: it was edited or damaged")
    tensors = mmap_safetensors(tpath)
    ids, texts, metas, ntoks = [], [], [], []
    with open(dpath, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            ids.append(rec["id"]); texts.append(rec["text"]); metas.append(rec["metadata"]); ntoks.append(rec["n_tokens"])
    n, c = manifest["n_documents"], manifest["n_chunks"]
    if len(ids) != n or tensors["chunk_doc"].shape[0] != c or tensors["doc_start"].shape[0] != n + 1:
        raise MemoryFormatError(f"{directory!r}: the manifest says {n} documents / {c} chunks but the files hold "
                                f"{len(ids)} / {tensors['chunk_doc'].shape[0]}: the manifest was edited or damaged")
    n_layers = len(manifest["fingerprint"].get("routing_layers", []))
    for name in ("keys_r", "keys", "values", "inputs", "keys_r_scale"):
        t = tensors.get(name)
        if t is not None and (t.dim() < 2 or t.shape[0] != n_layers or t.shape[1] != c):
            raise MemoryFormatError(f"{tpath}: {name} has shape {tuple(t.shape)}, but the manifest says {n_layers} "
                                    f"routing layers and {c} chunks: the files do not belong together")
    keys_r, keys_r_scale = tensors.get("keys_r"), tensors.get("keys_r_scale")
    if keys_r is not None and routing_device is not None:
        keys_r = keys_r.to(routing_device)
        keys_r_scale = None if keys_r_scale is None else keys_r_scale.to(routing_device)
    keys, values = tensors.get("keys"), tensors.get("values")
    if keys is not None and content_device is not None and torch.device(content_device).type != "cpu":
        keys, values = keys.to(content_device), values.to(content_device)
    return BankState(ids=tuple(ids), texts=tuple(texts), metadata=tuple(metas), n_tokens=tuple(ntoks),
                     doc_start=tensors["doc_start"].clone(), chunk_doc=tensors["chunk_doc"].clone(),
                     keys_r=keys_r, keys_r_scale=keys_r_scale, keys=keys, values=values,
                     inputs=tensors.get("inputs"), **_index(ids, metas))


_ST_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16), "I64": (np.int64, torch.int64),
              "I32": (np.int32, torch.int32), "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8),
              "BF16": (np.uint16, torch.bfloat16)}


def mmap_safetensors(path: str) -> dict:
    """Memory-map a safetensors file: parse its JSON header, map each tensor's bytes (copy-on-write)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise MemoryFormatError(f"{path} is truncated")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MemoryFormatError(f"{path} has a damaged header ({e})")
    size = os.path.getsize(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _ST_DTYPES:
            raise MemoryFormatError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which a memory never "
                                    "holds: the file was replaced or damaged")
        np_dtype, t_dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        if 8 + n + end > size:
            raise MemoryFormatError(f"{path} is truncated (tensor {name!r} ends past the file)")
        count = (end - start) // np.dtype(np_dtype).itemsize
        if count == 0:
            out[name] = torch.zeros(info["shape"], dtype=t_dtype)
            continue
        arr = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + n + start, shape=(count,))
        t = torch.from_numpy(arr)
        if t_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        out[name] = t.view(info["shape"])
    return out


def _select_rows(s: BankState, rows: list) -> BankState:
    rows_t = torch.tensor(rows, dtype=torch.long)
    counts = (s.doc_start[1:] - s.doc_start[:-1])[rows_t] if rows else torch.zeros(0, dtype=torch.long)
    chunk_idx = torch.cat([torch.arange(int(s.doc_start[r]), int(s.doc_start[r + 1])) for r in rows]) \
        if rows else torch.zeros(0, dtype=torch.long)

    def take(t):
        return None if t is None else t.index_select(1, chunk_idx.to(t.device))

    ids = tuple(s.ids[r] for r in rows)
    return BankState(ids=ids, texts=tuple(s.texts[r] for r in rows), metadata=tuple(s.metadata[r] for r in rows),
                     n_tokens=tuple(s.n_tokens[r] for r in rows),
                     doc_start=torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]),
                     chunk_doc=torch.repeat_interleave(torch.arange(len(rows)), counts),
                     keys_r=take(s.keys_r), keys_r_scale=take(s.keys_r_scale), keys=take(s.keys),
                     values=take(s.values), inputs=take(s.inputs),
                     **_index(ids, [s.metadata[r] for r in rows]))


def _pin(t: torch.Tensor) -> torch.Tensor:
    """Page-locked host memory makes host->device copies of selected chunks asynchronous (CUDA only)."""
    if torch.cuda.is_available() and not t.is_pinned():
        return t.pin_memory()
    return t


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
