"""MSAEngine: the public facade. Integrations, the CLI, evaluation and benchmarks talk only to this (and to
the leaf modules `types`, `errors`, `config`, `validation`); it composes `msa_plugins.engine` (model,
encoding, memory bank, routing, generation), which in turn uses `msa_plugins.kernels`.

A question flows route -> select -> answer:
    route    the question's own tokens -> routing queries -> per-layer document scores -> top-k (`route`)
    select   routed rows -> `RoutedDocument`s (text, metadata, scores), or pooled K̄/V̄ per layer (sparse)
    answer   a prompt (interleave: the documents' text) or a KV prefix (sparse/protocol) -> tokens -> `Stream`
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import re
import threading
import time
from typing import Iterator, Optional

import torch

from .config import ALL_COLLECTIONS, DEFAULT_COLLECTION, NOT_IN_MEMORY, ROUTINGS, AnswerOptions, MSAConfig
from .engine.encoding import Encoder
from .engine.generation import (GenerationStats, build_prompt, context_prompt, decode_stream, generate_tokens,
                                sparse_memory)
from .engine.model import DecoderModel, load_hf_model
from .engine.rerank import PAIR_PASSAGE_TOKENS, fuse_with_routing, pair_texts, question_likelihood
from .engine.router import QKRouter, Router, read_msa4b_router
from .engine.routing import FUSION_DEPTH, Routing, extend_chains, hybrid_route, lexical_topk, route, zscores
from .engine import storage
from .errors import (EmptyMemoryError, InputTooLongError, InvalidArgumentError, InvalidTypeError, MSAError,
                     RouterMismatchError)
from .models import DEFAULT_ROUTER_DIR, packaged_router_dir, resolve_model
from .types import GenerationResult, MemoryDocument, QueryResult, RoutedDocument, Snapshot, Stream, Where
from .validation import check_collection, check_history, check_messages, check_text, check_where_ids

logger = logging.getLogger(__name__)
_UNSET = object()
MEMORY_ROUTER_DIR = "router"  # an adapted memory keeps the router that keyed it in <memory>/router


def _make_bank(engine: "MSAEngine", max_doc: int):
    """The memory bank: its ingestion (tokenize, split, encode) is injected, so the bank never reaches
    into the model or the encoder."""
    from .engine.bank import MemoryBank
    from .engine.ingest import Ingestor

    cfg, model = engine.config, engine.model
    ingestor = Ingestor(tokenize=engine._tokenize,
                        detokenize=lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True),
                        encode=lambda token_lists, progress: engine.encoder.encode(token_lists, progress=progress),
                        max_doc_tokens=max_doc, split_long=cfg.split_long_documents)
    return MemoryBank(ingestor, engine.fingerprint(), routing_device=model.device,
                      content_device=model.device if cfg.content_tier == "device" else "cpu",
                      int8_routing_keys=cfg.int8_routing_keys, n_kv_heads=model.n_kv_heads)


class MSAEngine:
    """A language model holding a document collection as Memory Sparse Attention memory.

    Build with `MSAEngine.from_pretrained(...)`. Memory: `add`, `upsert`, `delete`, `get`, `snapshot`,
    `save`, `load`. Questions: `retrieve` (routed documents), `query` / `stream` (answers), `answer_from`
    (answer from given texts), `generate` / `stream_generate` (the model alone).
    """

    def __init__(self, model: DecoderModel, router=None, config: Optional[MSAConfig] = None, name: str = "model"):
        cfg = config or MSAConfig()
        self.model = model
        self.name = name
        if router is not None and cfg.routing_layers is None:
            layers = list(router.layers)
        else:
            layers = list(cfg.routing_layers) if cfg.routing_layers is not None else \
                list(range(model.n_layers // 2, model.n_layers))
        bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
        if bad or not layers:
            raise InvalidArgumentError(f"routing layers {layers} are not layers of this {model.n_layers}-layer model; "
                                       f"use indices 0..{model.n_layers - 1}")
        if router is not None:
            router = check_router(router, layers, model, cfg.doc_score)
        self.config = cfg
        self.routing_layers = layers
        self.router = router if router is not None else QKRouter(model, layers)
        # every router this engine has keyed its memory with, by fingerprint: a snapshot is routed with the
        # router that keyed it, also when `set_router` ran after the snapshot was taken
        self._routers = {self.router.fingerprint(): self.router}
        self.encoder = Encoder(model, layers, cfg.chunk_size, self.router, score=cfg.score,
                               keep_inputs=cfg.keep_inputs, batch_tokens=cfg.batch_tokens,
                               routing_chunk_size=cfg.key_chunk_size)
        self._bank = _make_bank(self, cfg.max_doc_tokens or model.max_positions)
        self._sharded_router = None  # memory-parallel routing (use_sharded_routing); None: this process

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: Optional[str] = None, router: Optional[str] = None, memory: Optional[str] = None,
                        config: Optional[MSAConfig] = None, device: Optional[str] = None, dtype=None,
                        **overrides) -> "MSAEngine":
        """Load a model (and optionally a router and a saved memory).

        Args:
            model: None (the embedded SmolLM2-135M-Instruct), a local Hugging Face folder, or a .gguf file.
            router: a router adapter folder (`msa train-router`), or "none" for training-free routing with
                the layer's own q/k projections. None: an MSA-4B checkpoint's own router projectors, or the
                router shipped for the embedded default model.
            memory: a saved memory folder to load.
            config: an `MSAConfig`; `overrides` replace its build settings (chunk_size=32) and answer
                defaults (k=8, max_new_tokens=64). The caller's config object is never changed.
            device: "cpu", "cuda", ... (default: CUDA when available).

        Unset arguments fall back to the environment: MSA_MODEL, MSA_ROUTER, MSA_MEMORY, MSA_DEVICE.
        """
        config = (config or MSAConfig()).with_overrides(**overrides)
        model = model if model is not None else os.environ.get("MSA_MODEL") or None
        router = router if router is not None else os.environ.get("MSA_ROUTER") or None
        memory = memory if memory is not None else os.environ.get("MSA_MEMORY") or None
        if router is None:  # the router that keyed the memory: an adapted one, or an earlier shipped one
            router = cls.router_for_memory(memory, model)
        device = device or os.environ.get("MSA_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        folder, name = resolve_model(model)
        hf_model, tokenizer = load_hf_model(folder, device=device, dtype=dtype)
        decoder = DecoderModel(hf_model, tokenizer, name=name)
        if router in ("none", "qk"):  # explicitly the training-free baseline (the layer's own q/k)
            router_obj = None
        elif router is not None:
            router_obj = Router.load(router)
        else:
            router_obj = read_msa4b_router(folder, decoder.n_heads, decoder.n_kv_heads, decoder.head_dim)
            if router_obj is None and (model is None or model == "default"):
                router_obj = Router.load(DEFAULT_ROUTER_DIR)  # the router shipped for the embedded default
        engine = cls(decoder, router=router_obj, config=config, name=name)
        if memory is not None:
            engine.load(memory)
        return engine

    @staticmethod
    def router_for_memory(memory: Optional[str], model: Optional[str] = None) -> Optional[str]:
        """The router folder that keyed the saved memory `memory`, when the default choice of `from_pretrained`
        would not be it: `<memory>/router` for an adapted memory, or, on the embedded default model (`model`
        None or "default"), an earlier router shipped in the package (upgrading never strands a memory). Else
        None. Every entry point that builds an engine before loading a memory (CLI, server) asks this.
        `model` None falls back to $MSA_MODEL, as in `from_pretrained`."""
        if memory is None:
            return None
        model = model if model is not None else os.environ.get("MSA_MODEL") or None
        adapted = os.path.join(memory, MEMORY_ROUTER_DIR)
        if os.path.isfile(os.path.join(adapted, "router.json")):
            return adapted
        return _packaged_router_of(memory) if model is None or model == "default" else None

    def fingerprint(self, config: Optional[MSAConfig] = None) -> dict:
        """What a saved memory must match to be loaded by this engine (model, tokenizer, router, P, ...);
        `config`: under these settings instead of the engine's."""
        m, cfg = self.model, config or self.config
        h = hashlib.sha256()
        for t in (m.embed_tokens.weight[:8], m.layers[-1].input_layernorm.weight, m.layers[0].self_attn.q_proj.weight[:8]):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return {"model": self.name, "config_hash": m.config_hash(), "tokenizer_hash": m.tokenizer_hash(),
                "weights_hash": h.hexdigest()[:16], "chunk_size": cfg.chunk_size,
                "routing_layers": list(self.routing_layers), "key_mode": self.router.fingerprint(),
                "score": cfg.score, "routing_keys": "int8" if cfg.int8_routing_keys else "float",
                # only when not the default: memories saved before the setting existed keep loading
                **({"doc_score": cfg.doc_score} if cfg.doc_score != "maxmax" else {}),
                **({"routing_chunk_size": cfg.key_chunk_size} if cfg.key_chunk_size != cfg.chunk_size else {})}

    @property
    def answer_defaults(self) -> AnswerOptions:
        return self.config.answer

    @property
    def model_name(self) -> str:
        return self.name

    @property
    def context_window(self) -> int:
        """The model's window in tokens (prompt + generated)."""
        return int(self.model.max_positions)

    @property
    def has_trained_router(self) -> bool:
        """True when routing uses trained router projectors (needed by mode="protocol")."""
        return isinstance(self.router, Router)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under the model's own tokenizer (no special tokens)."""
        return len(self.token_ids(text))

    def token_ids(self, text: str) -> list:
        """The ids of `text`'s tokens under the model's own tokenizer (no special tokens)."""
        if not isinstance(text, str):
            raise InvalidTypeError(f"the text must be a str, got {type(text).__name__}")
        return list(self._tokenize(text)) if text else []

    def _tokenize(self, text: str) -> list:
        return self.model.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ memory
    def add(self, texts, ids=None, metadata=None, progress: bool = True, collection: str = DEFAULT_COLLECTION) -> list:
        """Encode and add documents to `collection`; returns one id per text. An id already in the memory
        (in any collection) raises `DuplicateIdError` (use `upsert` to replace). On any error the memory is
        unchanged."""
        return self._bank.add(texts, ids=ids, metadata=metadata, progress=progress,
                              collection=check_collection(collection))

    def upsert(self, texts, ids, metadata=None, progress: bool = True, collection: str = DEFAULT_COLLECTION) -> list:
        """Replace the documents whose ids exist and add the others, in one step: a concurrent reader
        sees the old version or the new one, never neither. An id of another collection is refused."""
        return self._bank.upsert(texts, ids, metadata=metadata, progress=progress,
                                 collection=check_collection(collection))

    replace = upsert  # the name before 0.2

    def delete(self, ids, missing_ok: bool = False, collection: Optional[str] = DEFAULT_COLLECTION) -> list:
        """Remove documents of `collection` (a split long document by its parent id; None or "*": of any
        collection); returns the ids removed. Unknown ids raise `DocumentNotFoundError` and nothing is removed,
        unless `missing_ok`."""
        if isinstance(ids, str):
            raise InvalidTypeError(f"ids must be a list of str, not one string; wrap it: [{ids!r}]")
        if collection is not None:
            collection = check_collection(collection, allow_all=True)
        return self._bank.delete(check_where_ids(ids), missing_ok=missing_ok,
                                 collection=None if collection == ALL_COLLECTIONS else collection)

    def get(self, ids) -> list:
        """`MemoryDocument`s by id (a split long document's id gives its parts, in order)."""
        return self.snapshot().get(ids)

    def snapshot(self) -> Snapshot:
        """A read-only view of the memory now; later writes do not change it."""
        state = self._bank.state
        return Snapshot(state, nbytes=self._bank.nbytes_of(state))

    def __len__(self) -> int:
        return len(self._bank.state)

    def __contains__(self, doc_id) -> bool:
        return doc_id in self.snapshot()

    def save(self, directory: str) -> None:
        """Write the memory to `directory` atomically, under the folder's writer lock."""
        self._bank.save(directory)

    def load(self, directory: str, verify: bool = True) -> None:
        """Replace the memory with a saved one (checked against this engine's fingerprint; `verify`
        checks file checksums and structure).

        The memory's routing chunk size is adopted, as its keep_inputs is: it describes how the memory's
        routing keys were pooled (memories saved before `routing_chunk_size` existed pool them over
        `chunk_size` tokens), and later adds must pool theirs the same way. Every other setting must match."""
        def config_for(saved: dict) -> MSAConfig:  # the engine's settings with the memory's P_R adopted
            p_r = saved.get("routing_chunk_size", saved.get("chunk_size"))
            if saved.get("chunk_size") != self.config.chunk_size or not isinstance(p_r, int) or \
                    isinstance(p_r, bool) or p_r < 1 or p_r == self.config.key_chunk_size:
                return self.config  # nothing to adopt (or a mismatch the fingerprint check reports)
            return self.config.with_overrides(routing_chunk_size=p_r)

        def adopt(saved: dict) -> None:  # under the bank's lock, with the new state: writers encode under it
            config = config_for(saved)
            if config is self.config:
                return
            if self.config.routing_chunk_size is not None:
                logger.warning("memory %s pools its routing keys over %d tokens, not the %d this engine was given: "
                               "using the memory's", directory, config.key_chunk_size, self.config.key_chunk_size)
            else:
                logger.info("memory %s pools its routing keys over %d tokens: this engine now does too", directory,
                            config.key_chunk_size)
            self.config = config
            self.encoder.P_R = config.key_chunk_size

        self._bank.load(directory, verify=verify, fingerprint_for=lambda saved: self.fingerprint(config_for(saved)),
                        on_swap=adopt)
        if self._bank.keeps_inputs is not None:  # adopt the memory's setting for later adds (None: empty memory)
            self.encoder.keep_inputs = self._bank.keeps_inputs

    @contextlib.contextmanager
    def edit_saved(self, directory: str, timeout: float = 300.0):
        """Read-modify-write of a saved memory folder under its writer lock (threads and processes):
        loads the folder if it holds a memory (else starts from this engine's memory), yields, and saves
        on success. A concurrent writer waits up to `timeout` s, then `MemoryLockedError`."""
        with self._bank.locked(directory, timeout=timeout) as held:
            if held.holds_memory:
                self.load(directory)
            yield self
            self._bank.save(directory, lock=held)

    @contextlib.contextmanager
    def saving_to(self, directory: str, timeout: float = 300.0, reload_if_changed: bool = False):
        """Changes made in the block are saved to `directory` when it ends, or not kept at all: when the block or
        the save raises (a full disk, say), the memory goes back to what it was, and the folder keeps its last
        good copy. The folder's writer lock and the memory's are held throughout (other writers wait; readers
        do not). A server saves every change this way, so its live memory never drifts from its folder.
        Inside the block, change the memory only: saving it to another folder there takes that folder's lock
        after the memory's, the reverse of every other save (a save elsewhere would wait out its timeout), and
        load / set_router are refused (their settings could not be put back).

        `reload_if_changed=True`: when another writer (`msa ingest`, another process) has saved to the folder since
        this memory last loaded or saved it, the folder's memory is loaded first (under the lock), so the block
        changes that one and the save keeps the other writer's work. For a memory that only ever changes through
        this (a server's); any change made outside it since the last save would be dropped by the reload."""
        with self._bank.locked(directory, timeout=timeout) as held:
            if reload_if_changed and self._bank.changed_since_synced(held.directory):
                logger.warning("%s was saved by another writer since this memory last read it; loading it before "
                               "this change so that the other writer's work is kept", held.directory)
                self.load(held.directory)
            with self._bank.reverting() as undo:
                yield self
                # committed = kept: an interrupt while the save cleans up must not revert what the folder holds
                self._bank.save(directory, lock=held, on_commit=undo.keep)

    def use_sharded_routing(self, router=None) -> None:
        """Route memory-parallel through `router` (a `ShardedRouter` of `msa_plugins.engine.sharding`, used by
        `msa serve --nproc N`): every rank of its process group scores a shard of the memory; the selections
        are this process's own (scores to fp32 rounding). None: route here again. Only "msa" routing is sharded (hybrid
        and lexical rank here); texts and sparse K̄/V̄ stay in this process, which holds the whole memory."""
        self._sharded_router = router

    def set_router(self, router) -> None:
        """Use another trained router: re-keys the memory from its kept pooled inputs (no model forward)."""
        if isinstance(router, str):
            router = Router.load(router)
        router = check_router(router, self.routing_layers, self.model, self.config.doc_score)
        def keys_for(inputs: torch.Tensor) -> torch.Tensor:  # pooled inputs [L, C, hidden] -> keys [L, C, G*D]
            return torch.stack([self.encoder.routing_keys_from_inputs(layer, inputs[i], router)
                                for i, layer in enumerate(self.routing_layers)])

        def swap():  # under the bank's lock, with the new keys: writers never encode with the old router
            self.router = router
            self.encoder.router = router

        self._routers[router.fingerprint()] = router  # before the swap: a reader may see the new state at once
        # the fingerprint is built under the bank's lock: a concurrent load may adopt another P_R meanwhile
        self._bank.rekey(keys_for, lambda: {**self.fingerprint(), "key_mode": router.fingerprint(),
                                            "router_provenance": router.meta.get("provenance")}, on_swap=swap)

    def document_vectors(self, ids, snapshot: Optional[Snapshot] = None) -> torch.Tensor:
        """One unit vector per document, for diversity measures such as MMR: the mean of the document's
        chunk routing keys on each routing layer, unit-normalised per layer, concatenated over layers and
        divided by sqrt(L) -> [len(ids), L * G*D] float32 on the CPU. A split long document's id gives the
        mean over all its parts' chunks. Unknown ids raise `DocumentNotFoundError`."""
        snap = snapshot if snapshot is not None else self.snapshot()
        ids = check_where_ids(ids)
        snap.get(ids)  # unknown ids fail here, naming them
        s = snap._state
        L = s.keys_r.shape[0] if s.keys_r is not None else len(self.routing_layers)
        out = []
        for doc_id in ids:
            chunks = torch.cat([torch.arange(*s.chunk_range(r)) for r in s.rows_for(doc_id)])
            keys = s.keys_r.index_select(1, chunks.to(s.keys_r.device)).float()  # [L, c, G*D]
            if s.keys_r_scale is not None:  # int8 keys: dequantise per (chunk, KV head)
                scale = s.keys_r_scale.index_select(1, chunks.to(s.keys_r_scale.device))  # [L, c, G]
                keys = (keys.view(*scale.shape, -1) * scale[..., None]).flatten(2)
            mean = torch.nn.functional.normalize(keys.mean(dim=1), dim=-1)  # [L, G*D]
            out.append(mean.flatten() / L ** 0.5)
        return torch.stack(out).cpu() if out else torch.zeros(0, 0)

    def info(self) -> dict:
        snap = self.snapshot()
        return {"model": self.name, "routing_layers": self.routing_layers, "router": self.router.fingerprint(),
                "documents": len(snap), "chunks": snap.n_chunks, "tokens": snap.n_tokens, "bytes": snap.nbytes,
                "content_chunks": int(snap._state.keys.shape[1]) if snap._state.keys is not None else 0,
                "chunk_size": self.config.chunk_size, "routing_chunk_size": self.config.key_chunk_size,
                "score": self.config.score}

    # ------------------------------------------------------------------ routing
    def _allow_ids(self, snap: Snapshot, where: Where, collection: str = DEFAULT_COLLECTION) -> Optional[list]:
        """The ids routing may select (None: all of them): `where` within `collection`."""
        collection = check_collection(collection, allow_all=True)
        if where is not None and not callable(where):
            where = check_where_ids(where)
            if not where:
                raise InvalidArgumentError("the allow-list of ids is empty, so no document may be used; pass None "
                                           "to use the whole memory")
        counts = snap._state.collection_counts
        whole = collection == ALL_COLLECTIONS or (counts.get(collection, 0) == len(snap))  # no collection mask
        if where is None and whole:
            return None
        return snap.select(where, collection=None if whole else collection)

    def _check_question(self, question: str) -> list:
        """The question's tokens, refused before any model work when longer than the limit."""
        question = check_text(question)
        limit = self.config.max_question_tokens or self.model.max_positions
        n = len(self._tokenize(question))
        if n > limit:
            raise InputTooLongError(f"the question has {n} tokens, more than the limit of {limit} "
                                    "(max_question_tokens, or the model's window); shorten it")
        return question

    def _routing_prompt(self, question: str):
        """The prompt routing reads the question's own tokens from (also what a router is trained on)."""
        return build_prompt(self.model, question, system=self.config.answer.system)

    def route(self, question: str, k: Optional[int] = None, where: Where = None, context: str = "",
              snapshot: Optional[Snapshot] = None, collection: str = DEFAULT_COLLECTION,
              routing: Optional[str] = None, _allow=_UNSET) -> Routing:
        """Rank memory documents for a question (its own tokens only, not the template; with `context`
        routed as part of the question). `routing`: "msa" (default: `config.answer.routing`), "hybrid"
        (router + BM25 fused) or "lexical" (BM25 alone). Returns the per-layer selections too. Raises
        `EmptyMemoryError` for an empty memory."""
        question = self._check_question(question)
        opts = self.config.answer.merged(k=k, routing=routing)
        k, routing = opts.k, opts.routing
        snap = snapshot if snapshot is not None else self.snapshot()
        if len(snap) == 0:
            raise EmptyMemoryError("the memory is empty: add documents before asking (engine.add or `msa ingest`)")
        allow = self._allow_ids(snap, where, collection) if _allow is _UNSET else _allow
        prompt = self._routing_prompt(question)
        if context:  # re-routing: question + injected text are both "the question" for routing
            ids = self._tokenize(context) + prompt.ids
            mask = [True] * (len(ids) - len(prompt.ids)) + prompt.question_mask
            if len(ids) > self.model.max_positions:  # keep the question and the injected text nearest to it
                ids, mask = ids[-self.model.max_positions:], mask[-self.model.max_positions:]
        else:
            ids, mask = prompt.ids, prompt.question_mask
        state, cfg = snap._state, self.config
        text = f"{context}\n{question}" if context else question  # what BM25 reads
        if routing == "lexical":
            rows, scores = lexical_topk(state, text, k, allow)
            L = len(self.routing_layers)
            return Routing([state.ids[r] for r in rows], scores, rows,
                           {layer: ([state.ids[r] for r in rows], list(scores)) for layer in self.routing_layers},
                           torch.tensor(rows, dtype=torch.long).view(1, -1).expand(L, -1).contiguous(),
                           router_scores=[])
        router = self._routers.get(state.key_mode, self.router) if state.key_mode else self.router
        q = self.encoder.routing_queries(ids, mask, router=router)
        if routing == "hybrid":
            return hybrid_route(q, state, self.routing_layers, text, k, allow_ids=allow,
                                backend=cfg.routing_backend, doc_score=cfg.doc_score, fusion=cfg.hybrid_fusion)
        if self._sharded_router is not None:  # the same selections, scored by every rank of the process group
            return self._sharded_router.route(q, state, self.routing_layers, k, allow_ids=allow,
                                              backend=cfg.routing_backend, doc_score=cfg.doc_score)
        return route(q, state, self.routing_layers, k, allow_ids=allow, backend=cfg.routing_backend,
                     doc_score=cfg.doc_score)

    def retrieve(self, question: str, k: Optional[int] = None, where: Where = None,
                 snapshot: Optional[Snapshot] = None, collection: str = DEFAULT_COLLECTION,
                 routing: Optional[str] = None, rounds: int = 1, k_per_round: bool = False,
                 whole_texts: bool = False, rerank: int = 0) -> list:
        """The documents the router selects for `question`, best first (layer-mean ranking).

        `whole_texts=True`: a text longer than the window (stored in parts `<id>#<p>`) counts once, as its
        best-routed part (`doc.whole_id` names the text): routing goes deeper until k distinct texts are found
        or the memory runs out. What a vector store's "top k" means to its caller.

        `where`: a predicate on `MemoryDocument`, or a collection of ids; applied before top-k, within
        `collection` ("*": every collection). `routing`: "msa" (default: `config.answer.routing`),
        "hybrid" (router + BM25 fused) or "lexical" (BM25). `rounds` > 1 (multi-hop; at most
        `config.max_rounds`): the same total k split over rounds (round r gets ceil of what is left / rounds
        left; no more rounds than k), or with `k_per_round=True` k documents per round; each later round routes
        the question with the text found so far as context, among the documents not found yet: by default once
        per document of the last round, chains of documents scored as a beam (`MSAConfig.round_routing`); the
        documents come round by round (`RoutedDocument.round`). These are exactly the documents
        `query(mode="interleave", k=, rounds=, k_per_round=)` answers from when given the same values (retrieve's
        own defaults are one round and k in all, not `config.answer`'s; and `query` with abstain may answer
        "not in memory" instead). `rerank` = N > 0: each round's top max(N, its share of k) candidates are
        reordered by the model's own likelihood of the question given each (UPR) fused with their routing (in
        later rounds: chain) scores, and their `score` is that fused score (`query(rerank=N)` answers from the
        same documents); with `MSAConfig.rerank_scoring="path"` the likelihood given the top candidate's text
        followed by each is fused in too. Returns [] when the memory is empty or nothing passes."""
        question = self._check_question(question)
        k = self.config.answer.merged(k=k).k
        if whole_texts:
            snap = snapshot if snapshot is not None else self.snapshot()  # one view while routing deeper
            want = k * rounds if k_per_round else k
            ask = k
            while True:
                routed = self.retrieve(question, k=ask, where=where, snapshot=snap, collection=collection,
                                       routing=routing, rounds=rounds, k_per_round=k_per_round, rerank=rerank)
                best, seen = [], set()
                for d in routed:  # each text at its first (best) part
                    if d.whole_id not in seen:
                        seen.add(d.whole_id)
                        best.append(d)
                if len(best) >= want or len(routed) < ask * (rounds if k_per_round else 1):
                    return best[:want]
                ask *= 2
        # validated like the answer options, routing too, before an empty memory returns []
        checked = AnswerOptions(rounds=rounds, k_per_round=k_per_round, routing=routing or self.config.answer.routing,
                                rerank=rerank)
        self.check_rounds(checked.rounds)
        snap = snapshot if snapshot is not None else self.snapshot()
        allow = self._allow_ids(snap, where, collection)
        if len(snap) == 0 or allow == []:
            return []
        n_rounds, share = _round_shares(k, checked.rounds, checked.k_per_round)
        # routed (and reranked) as `stream` does it, so query answers from these documents
        first = self.route(question, k=max(self._first_round_depth(k, n_rounds), rerank), snapshot=snap,
                           routing=routing, _allow=allow)
        scorer = _QuestionLikelihood(self, question, snap) if rerank else None
        if rerank:
            first = self._rerank(first, scorer, max(rerank, k))
        rounds = self._route_rounds(question, n_rounds, share, snap, routing, allow, first=first, rerank=rerank,
                                    scorer=scorer)
        return [d for docs in rounds for d in docs]

    def check_rounds(self, rounds: int) -> None:
        """Raise `InvalidArgumentError` when `rounds` is more than this engine routes (`config.max_rounds`):
        what `query` and `retrieve` check, for surfaces that take rounds before their first question."""
        if rounds > self.config.max_rounds:
            raise InvalidArgumentError(f"rounds={rounds} is more than this engine's max_rounds="
                                       f"{self.config.max_rounds}; ask for fewer rounds, or build the engine "
                                       f"with MSAEngine.from_pretrained(..., max_rounds={rounds})")

    def _route_rounds(self, question: str, n_rounds: int, share, snap: Snapshot, routing: Optional[str],
                      allow, first: Routing, rerank: int = 0, scorer: Optional["_QuestionLikelihood"] = None) -> list:
        """Documents found in up to `n_rounds` routing rounds, one list per round (rounds that find nothing
        end it). `share(r, found)`: how many documents round r adds, `found` being how many earlier rounds
        found. Later rounds route among the documents not found yet, as `config.round_routing` says: "chain"
        routes the question once per document of the last round, with that document's chain of texts as
        context, and keeps the best chains (`engine.routing.extend_chains`); "concat" routes it once with the
        text of every document found so far. A chain-found document's `score` is its routing score given its
        parent's chain; the round lists documents best chain first. `first`: the question's own routing,
        `_first_round_depth` deep (already reranked when `rerank`). `rerank` = N > 0: each later round's top
        max(N, its share) candidates (chains, or the concat ranking) are reordered as round 1's were, by the
        question's likelihood given the candidate fused with its chain (or routing) score; `scorer` keeps the
        likelihoods round 1 computed, so a candidate is scored once per question. The document's `score` is
        then that fused score; a chain's own score (for the next round) stays its routing chain score."""
        chain = self.config.round_routing == "chain" and n_rounds > 1
        n = share(0, 0)
        rows, scores = first.rows[:n], first.scores[:n]
        rounds = [_routed_documents(snap, rows, scores, 0)]
        texts = snap._state.texts
        # the last round's documents as chain ends: (chain score, the chain's texts, root first)
        ends = [(z, (texts[row],)) for z, row in zip(zscores(first.scores)[:n], rows)]
        found = len(rows)
        for r in range(1, n_rounds):
            seen = {d.id for docs in rounds for d in docs}
            allow_r = [d for d in (allow if allow is not None else snap.ids) if d not in seen]
            n = share(r, found)
            if not allow_r or not rounds[-1] or n < 1:
                break
            if chain:
                parents = []
                for chain_score, path in ends:
                    got = self.route(question, k=max(n, FUSION_DEPTH), context="\n\n".join(path), snapshot=snap,
                                     routing=routing, _allow=allow_r)
                    parents.append((chain_score, got.rows, got.scores))
                links = extend_chains(parents, max(n, rerank))
                scores = [x.score for x in links]
                if rerank and len(links) > 1:  # else links are at most n already
                    order, fused = _fused_order([x.chain for x in links], [x.row for x in links], scorer,
                                                self.config.rerank_scoring == "path")
                    links, scores = [links[i] for i in order[:n]], [fused[i] for i in order[:n]]
                new = _routed_documents(snap, [x.row for x in links], scores, r)
                ends = [(x.chain, ends[x.parent][1] + (texts[x.row],)) for x in links]
            else:
                context = "\n\n".join(d.text for docs in rounds for d in docs)
                got = self.route(question, k=max(n, rerank), context=context, snapshot=snap, routing=routing,
                                 _allow=allow_r)
                if rerank:
                    got = self._rerank(got, scorer, max(n, rerank))
                got = got.top(n)
                new = _routed_documents(snap, got.rows, got.scores, r)
            if not new:
                break
            rounds.append(new)
            found += len(new)
        return rounds

    def _rerank(self, routing: Routing, scorer: "_QuestionLikelihood", depth: int) -> Routing:
        """`routing`'s top `depth` documents (deeper ones are dropped) reordered by the model's likelihood of the
        question given each document (`scorer`), fused with their routing scores (`engine/rerank.py`; with
        `config.rerank_scoring="path"` also given the top one's text first); ties keep the routing's order.
        `scores` become the fused scores; `router_scores` and `per_layer` stay the router's."""
        top = routing.top(depth)
        if len(top.rows) < 2:
            return top
        order, fused = _fused_order(top.scores, top.rows, scorer, self.config.rerank_scoring == "path")
        return Routing([top.ids[i] for i in order], [fused[i] for i in order], [top.rows[i] for i in order],
                       top.per_layer, top.per_layer_rows, [top.router_scores[i] for i in order])

    def _first_round_depth(self, n: int, n_rounds: int) -> int:
        """How deep round 1 is routed: chain scores are z-scores within a ranking, so with chained rounds
        every ranking is read FUSION_DEPTH deep; otherwise its n documents are all it needs."""
        return max(n, FUSION_DEPTH) if self.config.round_routing == "chain" and n_rounds > 1 else n

    # ------------------------------------------------------------------ answering
    def query(self, question: str, options: Optional[AnswerOptions] = None, **kw) -> QueryResult:
        """Answer from memory; see `stream` for the arguments."""
        return self.stream(question, options, **kw).collect()

    def stream(self, question: str, options: Optional[AnswerOptions] = None, *, where: Where = None,
               history: Optional[list] = None, snapshot: Optional[Snapshot] = None,
               collection: str = DEFAULT_COLLECTION, **overrides) -> Stream:
        """Answer `question` from memory, piece by piece.

        Args:
            options: an `AnswerOptions` (default: `config.answer`); `overrides` replace single fields
                (k=3, mode="sparse", max_new_tokens=32, temperature, seed, stop, system, prompt_style, rounds,
                k_per_round, rerank).
            where: restrict routing to these documents (predicate on `MemoryDocument`, or ids).
            collection: route within this collection ("*": all; default "default").
            history: earlier chat turns [{"role", "content"}], placed before the question.
            snapshot: answer from this view of the memory (default: the memory now).
        Returns:
            a `Stream`: `.documents` before the first piece, `.result` (`QueryResult`) after the last.
            With no document to route to (empty memory, or `where` admits none) interleave answers from
            the model alone and logs a warning; `.documents` is then [].
            With rounds > 1 (interleave only, at most `config.max_rounds`) each round adds k documents, or
            with k_per_round=False k in all: exactly `retrieve(question, k, rounds=, k_per_round=)`'s documents.
            Abstention and `per_layer` read the question's own top k either way.
        """
        t0 = time.perf_counter()
        opts = _merge_options(options, self.config.answer, overrides)
        question = self._check_question(question)
        history = check_history(history)
        if opts.mode == "protocol" and not self.has_trained_router:
            raise InvalidArgumentError("mode 'protocol' needs a checkpoint or adapter with trained router projectors; "
                                       "use 'interleave' or 'sparse' with this model")
        self.check_rounds(opts.rounds)
        if opts.abstain and opts.routing == "lexical":
            raise InvalidArgumentError("abstain=True decides on the router's scores, which routing='lexical' does not "
                                       "compute; use routing 'msa' or 'hybrid'")
        snap = snapshot if snapshot is not None else self.snapshot()
        allow = self._allow_ids(snap, where, collection)
        # the question and history must fit before any routing work is spent on them
        self._check_fits(build_prompt(self.model, question, system=opts.system, history=history).ids, opts, 0)
        if len(snap) == 0 or allow == []:
            if opts.abstain:  # nothing to answer from is the clearest "not in memory"
                return self._abstained(opts, t0, Routing([], [], [], {}))
            logger.warning("no memory document to route to (%s): answering from the model alone",
                           "the memory is empty" if len(snap) == 0 else "the filter admits none")
            return self._answer_texts(question, [], [], opts, history, t0, per_layer={})
        # rounds > 1 only in interleave (AnswerOptions checks), <= max_rounds (checked above)
        n_rounds, share = _round_shares(opts.k, opts.rounds, opts.k_per_round)
        # routed once, as deep as the rounds need; abstention and `per_layer` read its top k
        deep = self.route(question, k=max(self._first_round_depth(opts.k, n_rounds), opts.rerank), snapshot=snap,
                          routing=opts.routing, _allow=allow)
        routing = deep.top(opts.k)
        if opts.abstain and not self._in_memory(snap, routing):  # on the router's own scores, as calibrated
            return self._abstained(opts, t0, routing)
        scorer = _QuestionLikelihood(self, question, snap) if opts.rerank else None
        if opts.rerank:
            deep = self._rerank(deep, scorer, max(opts.rerank, opts.k))
            routing = deep.top(opts.k)
        rounds = [_routed_documents(snap, routing.rows, routing.scores, 0)]
        if opts.mode == "interleave":
            if n_rounds > 1:  # each later round adds k documents not found yet, or its share of k in all
                rounds = self._route_rounds(question, n_rounds, share, snap, opts.routing, allow, first=deep,
                                            rerank=opts.rerank, scorer=scorer)
            return self._answer_texts(question, [d for docs in rounds for d in docs], rounds, opts, history, t0,
                                      per_layer=routing.per_layer, routing_s=time.perf_counter() - t0)
        # sparse / protocol: the routing layers attend to the selected documents' pooled K̄/V̄
        memory = sparse_memory(snap._state, routing.per_layer_rows, self.model.n_layers, self.routing_layers, self.model)
        offset = int(routing.per_layer_rows.shape[1])  # the k documents count as k position slots
        prompt = build_prompt(self.model, question, system=opts.system, history=history)
        self._check_fits(prompt.ids, opts, offset)
        stats = GenerationStats()
        if opts.mode == "protocol":
            loop = ProtocolLoop(self, snap, allow)
            tokens = loop.tokens(prompt.ids, memory, offset, opts, stats)
        else:
            loop = None
            tokens = generate_tokens(self.model, prompt.ids, opts.max_new_tokens, opts.temperature, memory=memory,
                                     position_offset=offset, seed=opts.seed, stats=stats)
        return self._stream(rounds, tokens, stats, opts, t0, time.perf_counter() - t0, routing.per_layer,
                            extra_rounds=loop.rounds if loop else None)

    # ------------------------------------------------------------------ "not in memory"
    def calibrate_abstention(self, questions, gold_ids, where: Where = None, collection: str = DEFAULT_COLLECTION,
                             signal: str = "top1") -> dict:
        """Learn the score below which `query(..., abstain=True)` answers "not in memory", from a dev split
        of labelled questions: each question is routed twice, once over the memory (it should answer) and
        once with its gold documents removed (it should abstain); the threshold on the router's `signal`
        ("top1": the best layer-mean score; "margin": best minus second best) that best separates the two
        (highest balanced accuracy) is stored with the memory (saved in its manifest; reset by
        `set_router`). Returns it with the dev precision and recall of abstaining."""
        from .validation import check_choice

        check_choice(signal, ("top1", "margin"), "signal")
        if isinstance(questions, str):
            raise InvalidTypeError("questions must be a list of str, not one string; wrap it: [question]")
        questions, gold_ids = list(questions), [check_where_ids(g) for g in gold_ids]
        if not questions or len(questions) != len(gold_ids):
            raise InvalidArgumentError(f"calibration needs questions and one list of gold ids per question (got "
                                       f"{len(questions)} questions and {len(gold_ids)} gold lists)")
        snap = self.snapshot()
        allow = self._allow_ids(snap, where, collection)
        base = allow if allow is not None else snap.ids
        base_set = set(base)
        answerable, removed = [], []
        for question, gold in zip(questions, gold_ids):
            held = set(snap.select(gold))  # a parent id removes all its parts
            if not held or not (held & base_set):
                raise InvalidArgumentError(f"the gold documents {gold[:3]} of {question[:60]!r} are not in the memory "
                                           "(or not admitted by where/collection); calibrate on questions it answers")
            for admit, out in ((base, answerable), ([d for d in base if d not in held], removed)):
                got = self.route(question, k=2, snapshot=snap, routing="msa", _allow=admit) if admit else None
                out.append(_signal(got.router_scores if got else [], signal))
        threshold, stats = _best_threshold(answerable, removed)
        calibration = {"threshold": threshold, "signal": signal, "n_dev": len(questions),
                       "router": self.router.fingerprint(), **stats}
        self._bank.set_calibration(calibration)
        return dict(calibration)

    def _in_memory(self, snap: Snapshot, routing: Routing) -> bool:
        cal = snap._state.calibration
        if cal is None:
            raise InvalidArgumentError("abstain=True needs a threshold calibrated for this memory and router; "
                                       "run engine.calibrate_abstention(dev_questions, dev_gold_ids) first")
        return _signal(routing.router_scores, cal.get("signal", "top1")) >= cal["threshold"]

    def _abstained(self, opts: AnswerOptions, t0: float, routing: Routing) -> Stream:
        """The "not in memory" answer: no document, no generation, `QueryResult.abstained` set."""
        routing_s = time.perf_counter() - t0

        def finish(text: str) -> QueryResult:
            result = QueryResult(answer=text, mode=opts.mode, documents=[], rounds=[], per_layer=routing.per_layer,
                                 timings={"routing_s": routing_s, "total_s": time.perf_counter() - t0},
                                 prompt_tokens=0, completion_tokens=0, finish_reason="abstained")
            result.abstained = True
            return result

        return Stream([], iter([NOT_IN_MEMORY]), finish)

    def answer_from(self, question: str, texts, options: Optional[AnswerOptions] = None, *,
                    history: Optional[list] = None, **overrides) -> Stream:
        """Interleave answering over the given `texts` (no routing): the same prompt a routed answer gets.
        For comparing prompts and retrievers on one generator (the evaluation uses it)."""
        t0 = time.perf_counter()
        opts = _merge_options(options, self.config.answer, overrides)
        question = self._check_question(question)
        if isinstance(texts, str):
            raise InvalidTypeError("texts must be a list of str, not one string; wrap it: [text]")
        texts = [check_text(t, "text") for t in texts]
        history = check_history(history)
        docs = [RoutedDocument(f"text-{i}", t, float("nan"), {}, 0, i) for i, t in enumerate(texts)]
        return self._answer_texts(question, docs, [docs], opts, history, t0, per_layer={})

    def _answer_texts(self, question, docs, rounds, opts, history, t0, per_layer, routing_s: float = 0.0) -> Stream:
        """Interleave mode's answer: the documents' text in the prompt (dropping the lowest-ranked ones
        that do not fit the window, with a warning)."""
        style = opts.prompt_style
        prompt = context_prompt(self.model, question, [d.text for d in docs], style=style, system=opts.system,
                                history=history)
        window = self.model.max_positions
        if len(prompt.ids) + opts.max_new_tokens > window and docs:
            kept = list(docs)
            while kept and len(prompt.ids) + opts.max_new_tokens > window:
                kept.pop()
                prompt = context_prompt(self.model, question, [d.text for d in kept], style=style,
                                        system=opts.system, history=history)
            logger.warning("the %d routed documents do not fit the model's window of %d tokens with %d new tokens; "
                           "answering from the top %d (lower k, or max_doc_tokens, to avoid this)",
                           len(docs), window, opts.max_new_tokens, len(kept))
            rounds = [[d for d in docs_r if d in kept] for docs_r in rounds]
        self._check_fits(prompt.ids, opts, 0)
        stats = GenerationStats()
        tokens = generate_tokens(self.model, prompt.ids, opts.max_new_tokens, opts.temperature, seed=opts.seed,
                                 stats=stats)
        return self._stream(rounds, tokens, stats, opts, t0, routing_s, per_layer)

    def _check_fits(self, prompt_ids: list, opts: AnswerOptions, offset: int) -> None:
        window = self.model.max_positions
        if offset + len(prompt_ids) + opts.max_new_tokens > window:
            raise InputTooLongError(f"the prompt ({len(prompt_ids)} tokens) plus {opts.max_new_tokens} new tokens "
                                    f"does not fit the model's window of {window} tokens; shorten the question or "
                                    "history, or lower max_new_tokens")

    def _stream(self, rounds, tokens: Iterator[int], stats: GenerationStats, opts: AnswerOptions, t0: float,
                routing_s: float, per_layer: dict, extra_rounds: Optional[list] = None) -> Stream:
        pieces = cut_at_stop(decode_stream(self.model.tokenizer, tokens), opts.stop, stats)

        def finish(text: str) -> QueryResult:
            all_rounds = rounds + (extra_rounds or [])
            return QueryResult(answer=text.strip(), mode=opts.mode, documents=[d for r in all_rounds for d in r],
                               rounds=all_rounds, per_layer=per_layer,
                               timings=stats.timings(total_s=time.perf_counter() - t0, routing_s=routing_s),
                               prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                               finish_reason=stats.finish_reason)

        return Stream([d for r in rounds for d in r], pieces, finish)

    # ------------------------------------------------------------------ plain generation (no memory)
    def generate(self, messages, options: Optional[AnswerOptions] = None, *, tools: Optional[list] = None,
                 **overrides) -> GenerationResult:
        """The model as a plain chat LLM (no memory): the same generator a RAG baseline uses."""
        return self.stream_generate(messages, options, tools=tools, **overrides).collect()

    @property
    def supports_tools(self) -> bool:
        """Whether the model's chat template renders tool schemas (`generate(..., tools=...)`), as the
        Qwen2/Qwen3 templates do. Without it, adapters describe tools in the prompt instead."""
        template = getattr(self.model.tokenizer, "chat_template", None)
        return isinstance(template, str) and "tools" in template

    def stream_generate(self, messages, options: Optional[AnswerOptions] = None, *, tools: Optional[list] = None,
                        **overrides) -> Stream:
        """Plain generation, piece by piece: a `Stream` with no documents and a `GenerationResult`.
        Uses max_new_tokens, temperature, seed and stop of the options. `tools` (JSON-schema function
        descriptions, OpenAI style) go to the chat template when it supports them (`supports_tools`);
        otherwise they are refused."""
        t0 = time.perf_counter()
        opts = _merge_options(options, self.config.answer, overrides)
        messages = check_messages(messages)
        tok = self.model.tokenizer
        template_kw = {}
        if tools:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
                raise InvalidTypeError("tools must be a list of JSON-schema dicts ({'type': 'function', 'function': ...})")
            if not self.supports_tools:
                raise InvalidArgumentError(f"the chat template of {self.name} does not render tools; describe them in "
                                           "the prompt instead (the LangChain and LlamaIndex adapters do this)")
            template_kw["tools"] = list(tools)
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False,
                                          **template_kw)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = self._tokenize("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")
        ids = list(ids)
        self._check_fits(ids, opts, 0)
        stats = GenerationStats()
        pieces = cut_at_stop(decode_stream(tok, generate_tokens(self.model, ids, opts.max_new_tokens, opts.temperature,
                                                                seed=opts.seed, stats=stats)), opts.stop, stats)

        def finish(text: str) -> GenerationResult:
            return GenerationResult(text, stats.prompt_tokens, stats.completion_tokens,
                                    stats.timings(total_s=time.perf_counter() - t0), stats.finish_reason)

        return Stream([], pieces, finish)

    # ------------------------------------------------------------------ router training
    def adapt_router(self, *, epochs=None, seed: int = 0, resume: bool = True, progress: bool = True, out=None,
                     teachers=None, config=None, keep_checkpoints: bool = False):
        """Adapt the router to the memory's own documents (no labels: inverse-cloze pseudo-queries, with
        MiniLM / BM25 as teachers when installed) and re-key the memory in place; needs keep_inputs=True.
        See `msa_plugins.trainer.adapt_router_for`; returns its `AdaptResult`."""
        from .trainer import adapt_router_for

        return adapt_router_for(self, epochs=epochs, seed=seed, resume=resume, progress=progress, out=out,
                                teachers=teachers, config=config, keep_checkpoints=keep_checkpoints)

    def train_router(self, docs=None, questions=(), *, out=None, config=None, dev_fraction: float = 0.1,
                     ict_per_doc: int = 2, ict_titles: bool = True, resume: bool = True, export_msa4b_path=None,
                     progress: bool = True, teachers=None, fine_tune: bool = False):
        """Train a router for this model (see `msa_plugins.trainer.train_router_for`): on `docs`
        ((id, title, text) triples; None: the memory's own documents) with inverse-cloze pairs and optional
        labelled `questions`; `teachers` ("auto", or names such as ["minilm", "bm25"]) are distilled;
        `fine_tune` starts from this engine's trained router instead of `config.init` (config None: then
        adaptation's setting, `trainer.adapt_train_config()`). The memory is left unchanged; use `set_router`
        to adopt the result."""
        from .trainer import adapt_train_config, train_router_for

        if fine_tune and not self.has_trained_router:
            raise InvalidArgumentError("fine_tune=True needs a trained router to start from; this engine routes "
                                       "with the model's own q/k projections (load one with router=...)")
        if fine_tune and config is None:
            config = adapt_train_config()
        return train_router_for(self, docs, questions, out=out, config=config, dev_fraction=dev_fraction,
                                ict_per_doc=ict_per_doc, ict_titles=ict_titles, resume=resume,
                                export_msa4b_path=export_msa4b_path, progress=progress, teachers=teachers,
                                init_router=self.router if fine_tune else None)


class ProtocolLoop:
    """MSA-4B's retrieval protocol: the model writes `[<memory index>]` + delimiter; the engine appends that
    document's original text to the context and lets it continue, until the end marker. The documents it
    injected are in `rounds` (one list per injection) once generation ends."""

    def __init__(self, engine: MSAEngine, snap: Snapshot, allow: Optional[list]):
        self.engine = engine
        self.snap = snap
        self.allow = None if allow is None else set(allow)
        self.rounds: list = []

    def tokens(self, prompt_ids: list, memory, offset: int, opts: AnswerOptions, stats: GenerationStats):
        cfg, model = self.engine.config, self.engine.model
        tok = model.tokenizer
        pattern = re.compile(r"\[(\d+)\]" + re.escape(cfg.protocol_delimiter))
        context = list(prompt_ids)
        emitted = 0
        state = self.snap._state
        for step in range(cfg.max_rounds + 1):
            segment = GenerationStats()
            seg_ids = []
            for t in generate_tokens(model, context, opts.max_new_tokens - emitted, opts.temperature, memory=memory,
                                     position_offset=offset, seed=opts.seed, stats=segment):
                seg_ids.append(t)
                emitted += 1
                yield t
                text = tok.decode(seg_ids, skip_special_tokens=True)
                if cfg.protocol_end_marker in text or (pattern.search(text) and step < cfg.max_rounds):
                    break
            stats.add(segment)
            text = tok.decode(seg_ids, skip_special_tokens=True)
            m = pattern.search(text)
            if emitted >= opts.max_new_tokens or cfg.protocol_end_marker in text or not m or step == cfg.max_rounds:
                return
            row = int(m.group(1))
            if not 0 <= row < len(state.ids) or (self.allow is not None and state.ids[row] not in self.allow):
                return  # an unknown or filtered-out document is never injected
            self.rounds.append(_routed_documents(self.snap, [row], [float("nan")], step + 1))
            context = context + seg_ids + self.engine._tokenize(state.texts[row] + cfg.protocol_delimiter)


def _merge_options(options: Optional[AnswerOptions], defaults: AnswerOptions, overrides: dict) -> AnswerOptions:
    if options is not None and not isinstance(options, AnswerOptions):
        raise InvalidTypeError(f"options must be an AnswerOptions, got {type(options).__name__}; pass single "
                               "settings as keywords (k=3)")
    return (options or defaults).merged(**overrides)


def _signal(router_scores: list, signal: str) -> float:
    """The abstention signal of a routing (-inf when nothing could be routed to)."""
    if not router_scores:
        return float("-inf")
    if signal == "margin":
        return float(router_scores[0] - router_scores[1]) if len(router_scores) > 1 else float("inf")
    return float(router_scores[0])


def _best_threshold(answerable: list, removed: list) -> tuple:
    """The threshold t (abstain when signal < t) with the best balanced accuracy on the two dev lists,
    midway between neighbouring values; and the dev precision/recall of abstaining there."""
    # only finite values place a cut: -inf (nothing to route to) always abstains, and +inf (a margin with one
    # document admitted) never does, under any finite threshold; an infinite one could not be saved
    values = sorted(v for v in set(answerable + removed) if math.isfinite(v))
    cuts = [values[0] - 1e-6] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1e-6] \
        if values else [0.0]
    best = None
    na, nr = len(answerable), len(removed)
    for t in cuts:  # ascending: on a tie the lower threshold (abstaining less) wins
        tp = sum(v < t for v in removed)
        fp = sum(v < t for v in answerable)
        key = tp * na + (na - fp) * nr  # balanced accuracy * 2 * na * nr, in integers (exact ties)
        if best is None or key > best[0]:
            best = (key, t, tp, fp)
    key, t, tp, fp = best
    return float(t), {"dev_balanced_accuracy": key / (2 * na * nr), "dev_precision": tp / (tp + fp) if tp + fp else 0.0,
                      "dev_recall": tp / nr}


def _fused_order(route_scores: list, rows: list, scorer: "_QuestionLikelihood", path: bool = False) -> tuple:
    """(candidate indices best first, fused scores): z(routing or chain score) + z(question likelihood), ties in
    the given order. `path` (`rerank_scoring="path"`): + z(question likelihood given the anchor's text, then the
    candidate's), the anchor being the candidate the first sum ranks first (engine/rerank.py)."""
    alone = scorer(rows)
    fused = fuse_with_routing(route_scores, alone)
    if path:
        anchor = rows[min(range(len(fused)), key=lambda i: (-fused[i], i))]
        fused = fuse_with_routing(route_scores, alone, scorer(rows, anchor=anchor))
    return sorted(range(len(fused)), key=lambda i: (-fused[i], i)), fused


class _QuestionLikelihood:
    """One question's UPR likelihood given bank rows (`engine.rerank.question_likelihood`), each row (and with path
    scoring each (anchor, row) pair) scored once: the rounds of one question rerank overlapping candidates."""

    def __init__(self, engine: "MSAEngine", question: str, snap: Snapshot):
        self.engine, self.question, self.texts = engine, question, snap._state.texts
        self.known: dict = {}  # (anchor row or None, row) -> likelihood

    def __call__(self, rows: list, anchor: Optional[int] = None) -> list:
        """The likelihood given each row's text; with `anchor` (path scoring), given the anchor row's text, then
        each row's."""
        anchor = None if anchor is None else int(anchor)
        keys = [(anchor, int(r)) for r in rows]
        todo = list(dict.fromkeys(key for key in keys if key not in self.known))
        if todo:
            model = self.engine.model
            texts = [self.texts[r] for _, r in todo]
            cut = {} if anchor is None else {"max_passage_tokens": PAIR_PASSAGE_TOKENS}
            got = question_likelihood(model, model.tokenizer, self.question,
                                      texts if anchor is None else pair_texts(self.texts[anchor], texts),
                                      batch_tokens=self.engine.config.batch_tokens, **cut)
            self.known.update(zip(todo, got))
        return [self.known[key] for key in keys]


def _round_shares(k: int, rounds: int, k_per_round: bool) -> tuple:
    """(n_rounds, share): `share(r, found)` is how many documents round r adds, `found` being how many the
    earlier rounds found. k per round, or k in all: then round r adds the ceiling of what is left over the
    rounds left, so the first rounds get the remainder (k=5 in 2 rounds: 3 + 2), and there are no more
    rounds than k."""
    if k_per_round:
        return rounds, lambda r, found: k
    n_rounds = min(rounds, k)
    return n_rounds, lambda r, found: -(-(k - found) // (n_rounds - r))


def _routed_documents(snap: Snapshot, rows, scores, round_: int) -> list:
    s = snap._state
    return [RoutedDocument(s.ids[r], s.texts[r], float(score), copy.deepcopy(s.metadata[r]), round_, i, s.collections[r])
            for i, (r, score) in enumerate(zip(rows, scores))]


def _packaged_router_of(memory: Optional[str]) -> Optional[str]:
    """The packaged router folder that keyed the saved memory `memory` when it is not today's default, else None."""
    if memory is None:
        return None
    try:
        key_mode = storage.read_manifest(memory)["fingerprint"].get("key_mode")
    except (MSAError, OSError, KeyError, TypeError, AttributeError):
        return None  # loading the memory reports what is wrong with it
    found = packaged_router_dir(key_mode) if isinstance(key_mode, str) else None
    if found and os.path.realpath(found) != os.path.realpath(DEFAULT_ROUTER_DIR):
        logger.info("memory %s was keyed by the earlier shipped router %s: using that router", memory,
                    os.path.basename(found))
        return found
    return None


def check_router(router, layers: list, model: DecoderModel, doc_score: str = "maxmax"):
    """A trained router that fits this model and covers these routing layers, on the model's device.
    A router trained for another document score than the engine's (`MSAConfig.doc_score`) still routes, worse:
    logged as a warning naming the setting to use."""
    missing = [layer for layer in layers if layer not in router.layers]
    if missing:
        raise RouterMismatchError(f"the router has no projectors for routing layers {missing}; "
                                  f"it covers layers {router.layers}")
    if router.hidden_size != model.hidden_size or router.n_kv_heads != model.n_kv_heads \
            or router.head_dim != model.head_dim or router.n_heads != model.n_heads:
        raise RouterMismatchError("the router's shapes do not match this model (it was trained for another model)")
    made_for = router.meta.get("model_config_hash")
    if made_for and made_for != model.config_hash():
        raise RouterMismatchError(f"this router was trained for another model (config {made_for}, this model "
                                  f"{model.config_hash()}); train one for this model with `msa train-router`")
    router.meta.setdefault("model_config_hash", model.config_hash())
    trained_for = router.meta.get("doc_score", "maxmax")
    if trained_for != doc_score:
        logger.warning("this router was trained with doc_score=%r but the engine scores documents with %r; "
                       "build the engine with doc_score=%r for the routing it was trained for",
                       trained_for, doc_score, trained_for)
    return router.to(model.device, torch.float32)


def cut_at_stop(pieces: Iterator[str], stop: Optional[tuple], stats: GenerationStats) -> Iterator[str]:
    """Pass text pieces through until one of the `stop` strings appears; then end generation there."""
    if not stop:
        yield from pieces
        return
    text, emitted = "", 0
    hold = max(len(s) for s in stop) - 1  # a stop string may straddle pieces: keep that much back
    for piece in pieces:
        text += piece
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            stats.finish_reason = "stop"
            pieces.close()
            return
        safe = len(text) - hold
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    if len(text) > emitted:
        yield text[emitted:]


__all__ = ["MSAEngine", "MemoryDocument"]
