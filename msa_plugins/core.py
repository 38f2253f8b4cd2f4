"""MSAEngine: the public facade. Integrations and the CLI talk to this; it talks to `msa_plugins.engine`."""

from __future__ import annotations

import hashlib
import re
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .config import MODES, MSAConfig
from .engine.encoding import Encoder
from .engine.generation import (GenerationStats, build_prompt, context_prompt, decode_stream, generate_tokens,
                                sparse_memory)
from .engine.memory import MemoryBank
from .engine.model import DecoderModel, load_hf_model
from .engine.router import QKRouter, Router, RouterMismatchError, read_msa4b_router
from .engine.routing import Routing, route
from .models import DEFAULT_ROUTER_DIR, resolve_model


@dataclass
class RoutedDocument:
    id: str
    text: str
    score: float
    metadata: dict
    round: int = 0
    rank: int = 0


@dataclass
class QueryResult:
    answer: str
    mode: str
    documents: list  # RoutedDocument, in routing order (all rounds)
    rounds: list  # per round: list of RoutedDocument
    per_layer: dict  # routing layer -> (ids, scores) of that layer's own selection (first round)
    timings: dict  # routing_s, prefill_s, decode_s, first_token_s, total_s
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict
    finish_reason: str = "stop"


class QueryStream:
    """Iterate for text pieces; `documents` is known before the first piece, `result` after the last."""

    def __init__(self, documents: list, pieces: Iterator[str], finish):
        self.documents = documents
        self._pieces = pieces
        self._finish = finish
        self.result: Optional[QueryResult] = None

    def __iter__(self):
        parts = []
        try:
            for p in self._pieces:
                parts.append(p)
                yield p
        finally:  # also when the caller stops reading early: usage and timings of what was generated
            self._pieces.close() if hasattr(self._pieces, "close") else None
            self.result = self._finish("".join(parts))


class MSAEngine:
    """A language model holding a document collection as Memory Sparse Attention memory."""

    def __init__(self, model: DecoderModel, router=None, config: Optional[MSAConfig] = None, name: str = "model"):
        self.config = config or MSAConfig()
        self.model = model
        self.name = name
        cfg = self.config
        if router is not None and cfg.routing_layers is None:
            layers = list(router.layers)
        else:
            layers = list(cfg.routing_layers) if cfg.routing_layers is not None else \
                list(range(model.n_layers // 2, model.n_layers))
        bad = [l for l in layers if not 0 <= l < model.n_layers]
        if bad or not layers:
            raise ValueError(f"routing layers {layers} are not layers of this {model.n_layers}-layer model")
        if router is not None:
            router = check_router(router, layers, model)
        self.routing_layers = layers
        self.router = router if router is not None else QKRouter(model, layers)
        self.encoder = Encoder(model, layers, cfg.chunk_size, self.router, score=cfg.score,
                               keep_inputs=cfg.keep_inputs, batch_tokens=cfg.batch_tokens)
        max_doc = cfg.max_doc_tokens or model.max_positions
        self.memory = MemoryBank(self.encoder, self.fingerprint(), self._tokenize, max_doc,
                                 split_long=cfg.split_long_documents, routing_device=model.device,
                                 content_device=model.device if cfg.content_tier == "device" else "cpu",
                                 int8_routing_keys=cfg.int8_routing_keys)
        self._write_lock = threading.RLock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: Optional[str] = None, router: Optional[str] = None, memory: Optional[str] = None,
                        config: Optional[MSAConfig] = None, device: Optional[str] = None, dtype=None,
                        **overrides) -> "MSAEngine":
        """model: None (embedded SmolLM2-135M-Instruct), a local HF folder, or a .gguf file.
        router: a router adapter folder (msa train-router), or "none" for training-free routing with
        the layer's own q/k projections. An MSA-4B-format checkpoint's own router projectors are loaded
        automatically; the embedded default model uses the router shipped with the package. memory: a saved memory folder to load.
        `overrides` set MSAConfig fields (e.g. k=8, chunk_size=32)."""
        config = config or MSAConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown setting {key!r}; see MSAConfig for the settings")
            setattr(config, key, value)
        config.__post_init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        folder, name = resolve_model(model)
        hf_model, tokenizer = load_hf_model(folder, device=device, dtype=dtype)
        dm = DecoderModel(hf_model, tokenizer, name=name)
        router_obj = None
        if router in ("none", "qk"):  # explicitly the training-free baseline (the layer's own q/k)
            router_obj = None
        elif router is not None:
            router_obj = Router.load(router)
        else:
            router_obj = read_msa4b_router(folder, dm.n_heads, dm.n_kv_heads, dm.head_dim)
            if router_obj is None and (model is None or model == "default"):
                router_obj = Router.load(DEFAULT_ROUTER_DIR)  # the router shipped for the embedded default
        engine = cls(dm, router=router_obj, config=config, name=name)
        if memory is not None:
            engine.load(memory)
        return engine

    def fingerprint(self) -> dict:
        m = self.model
        h = hashlib.sha256()
        for t in (m.embed_tokens.weight[:8], m.layers[-1].input_layernorm.weight, m.layers[0].self_attn.q_proj.weight[:8]):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return {"model": self.name, "config_hash": m.config_hash(), "tokenizer_hash": m.tokenizer_hash(),
                "weights_hash": h.hexdigest()[:16], "chunk_size": self.config.chunk_size,
                "routing_layers": list(self.routing_layers), "key_mode": self.router.fingerprint(),
                "score": self.config.score, "routing_keys": "int8" if self.config.int8_routing_keys else "float"}

    def _tokenize(self, text: str) -> list:
        return self.model.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ memory
    def add(self, texts, ids=None, metadata=None, progress: bool = True) -> list:
        with self._write_lock:
            return self.memory.add(texts, ids=ids, metadata=metadata, progress=progress)

    def replace(self, texts, ids, metadata=None, progress: bool = True) -> list:
        """Swap existing documents for new versions in one step: readers see the old or the new, never neither."""
        with self._write_lock:
            return self.memory.replace(texts, ids, metadata=metadata, progress=progress)

    def delete(self, ids) -> None:
        with self._write_lock:
            self.memory.delete(ids)

    def get(self, ids) -> list:
        return self.memory.get(ids)

    def __len__(self):
        return len(self.memory)

    def save(self, directory: str) -> None:
        with self._write_lock:
            self.memory.save(directory)

    def load(self, directory: str) -> None:
        with self._write_lock:
            self.memory.load(directory)

    def set_router(self, router) -> None:
        """Use another trained router; re-keys the bank from its kept pooled inputs (no model forward)."""
        if isinstance(router, str):
            router = Router.load(router)
        router = check_router(router, self.routing_layers, self.model)
        with self._write_lock:
            self.memory.rekey(router)
            self.router = router
            self.encoder.router = router

    # ------------------------------------------------------------------ routing
    def route(self, question: str, k: Optional[int] = None, allow_ids=None, context: str = "",
              state=None) -> Routing:
        """Rank memory documents for a question (question tokens only, not template or context)."""
        question = check_text(question)
        state = state if state is not None else self.memory.state
        if len(state) == 0:
            raise LookupError("the memory is empty: add documents before asking (engine.add or `msa ingest`)")
        prompt = build_prompt(self.model, question, system=self.config.system_prompt)
        if context:  # re-routing: question + injected text are both "the question" for routing
            ids = self._tokenize(context) + prompt.ids
            mask = [True] * (len(ids) - len(prompt.ids)) + prompt.question_mask
        else:
            ids, mask = prompt.ids, prompt.question_mask
        q = self.encoder.routing_queries(ids, mask)
        return route(q, state, self.routing_layers, k or self.config.k, allow_ids=allow_ids,
                     backend=self.config.routing_backend)

    # ------------------------------------------------------------------ answering
    def query(self, question: str, **kw) -> QueryResult:
        stream = self.stream(question, **kw)
        for _ in stream:
            pass
        return stream.result

    def stream(self, question: str, mode: Optional[str] = None, k: Optional[int] = None,
               max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
               rounds: Optional[int] = None, allow_ids=None, history: Optional[list] = None,
               system: Optional[str] = None, seed: Optional[int] = None, stop: Optional[list] = None,
               prompt_style: Optional[str] = None) -> QueryStream:
        """prompt_style: how interleave mode shows the routed documents (engine.generation.PROMPT_STYLES);
        None: MSAConfig.prompt_style, else the default style. It does not change routing."""
        cfg = self.config
        mode = mode or cfg.mode
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        if mode == "protocol" and self.router.kind != "router":
            raise ValueError("mode 'protocol' needs a checkpoint or adapter with trained router projectors; "
                             "use 'interleave' or 'sparse' with this model")
        k = k or cfg.k
        max_new = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        temp = cfg.temperature if temperature is None else temperature
        system = system if system is not None else cfg.system_prompt
        t0 = time.perf_counter()
        state = self.memory.state  # one snapshot for the whole answer
        routing = self.route(question, k=k, allow_ids=allow_ids, state=state)
        rounds_docs = [self._routed_docs(state, routing.rows, routing.scores, 0)]
        memory, offset = None, 0
        if mode == "interleave":
            n_rounds = max(1, min(rounds or cfg.rounds, cfg.max_rounds))
            for r in range(1, n_rounds):
                seen = {d.id for rd in rounds_docs for d in rd}
                injected = "\n\n".join(d.text for rd in rounds_docs for d in rd)
                again = self.route(question, k=k, allow_ids=allow_ids, context=injected, state=state)
                new = [(row, s) for row, s in zip(again.rows, again.scores) if state.ids[row] not in seen]
                if not new:
                    break
                rounds_docs.append(self._routed_docs(state, [x[0] for x in new], [x[1] for x in new], r))
            docs = [d for rd in rounds_docs for d in rd]
            style = prompt_style or cfg.prompt_style
            prompt = context_prompt(self.model, question, [d.text for d in docs], style=style, system=system,
                                    history=history)
            window = self.model.max_positions
            if len(prompt.ids) + max_new > window:
                # the injected documents do not fit the model's window: keep the best-ranked ones that do
                kept = list(docs)
                while kept and len(prompt.ids) + max_new > window:
                    kept.pop()
                    prompt = context_prompt(self.model, question, [d.text for d in kept], style=style,
                                            system=system, history=history)
                warnings.warn(f"the {len(docs)} routed documents do not fit the model's window of {window} tokens "
                              f"with {max_new} new tokens; answering from the top {len(kept)} (lower k, or "
                              "max_doc_tokens, to avoid this)")
                rounds_docs = [[d for d in rd if d in kept] for rd in rounds_docs]
        else:  # sparse / protocol: the routing layers attend to the selected documents' pooled K̄/V̄
            docs = rounds_docs[0]
            memory = sparse_memory(state, routing.per_layer_rows, self.model.n_layers, self.routing_layers, self.model)
            offset = int(routing.per_layer_rows.shape[1])  # the k documents count as k position slots
            prompt = build_prompt(self.model, question, system=system, history=history)
        if offset + len(prompt.ids) + max_new > self.model.max_positions:
            raise ValueError(f"the prompt ({len(prompt.ids)} tokens) plus {max_new} new tokens does not fit the model's "
                             f"window of {self.model.max_positions} tokens; shorten the question or history")
        routing_s = time.perf_counter() - t0
        stats = GenerationStats()
        if mode == "protocol":
            tokens = self._protocol_tokens(state, prompt.ids, memory, offset, max_new, temp, seed, stats, rounds_docs,
                                           allow_ids)
        else:
            tokens = generate_tokens(self.model, prompt.ids, max_new, temp, memory=memory, position_offset=offset,
                                     seed=seed, stats=stats)
        pieces = cut_at_stop(decode_stream(self.model.tokenizer, tokens), stop, stats)

        def finish(text: str) -> QueryResult:
            total = time.perf_counter() - t0
            all_docs = [d for rd in rounds_docs for d in rd]
            return QueryResult(
                answer=text.strip(), mode=mode, documents=all_docs, rounds=rounds_docs, per_layer=routing.per_layer,
                timings={"routing_s": routing_s, "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
                         "first_token_s": routing_s + stats.first_token_s, "total_s": total},
                prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                finish_reason=stats.finish_reason)

        return QueryStream([d for rd in rounds_docs for d in rd], pieces, finish)

    def _routed_docs(self, state, rows, scores, rnd) -> list:
        return [RoutedDocument(state.ids[r], state.texts[r], float(s), dict(state.metadata[r]), rnd, i)
                for i, (r, s) in enumerate(zip(rows, scores))]

    def _protocol_tokens(self, state, prompt_ids, memory, offset, max_new, temp, seed, stats, rounds_docs, allow_ids):
        """MSA-4B's retrieval protocol: the model writes `[<memory index>]` + delimiter; we append that
        document's original text to the context and let it continue; the end marker ends retrieval."""
        tok = self.model.tokenizer
        pattern = re.compile(r"\[(\d+)\]" + re.escape(self.config.protocol_delimiter))
        context = list(prompt_ids)
        emitted = 0
        for step in range(self.config.max_rounds + 1):
            seg = GenerationStats()
            seg_ids = []
            for t in generate_tokens(self.model, context, max_new - emitted, temp, memory=memory,
                                     position_offset=offset, seed=seed, stats=seg):
                seg_ids.append(t)
                emitted += 1
                yield t
                text = tok.decode(seg_ids, skip_special_tokens=True)
                if self.config.protocol_end_marker in text:
                    break
                m = pattern.search(text)
                if m and step < self.config.max_rounds:
                    break
            stats.prompt_tokens = stats.prompt_tokens or seg.prompt_tokens
            stats.completion_tokens += seg.completion_tokens
            stats.prefill_s += seg.prefill_s
            stats.decode_s += seg.decode_s
            stats.first_token_s = stats.first_token_s or seg.first_token_s
            stats.finish_reason = seg.finish_reason
            text = tok.decode(seg_ids, skip_special_tokens=True)
            m = pattern.search(text)
            if emitted >= max_new or self.config.protocol_end_marker in text or not m or step == self.config.max_rounds:
                return
            row = int(m.group(1))
            if not 0 <= row < len(state) or (allow_ids is not None and state.ids[row] not in set(allow_ids)):
                return  # an unknown or filtered-out document is never injected
            rounds_docs.append(self._routed_docs(state, [row], [float("nan")], step + 1))
            context = context + seg_ids + self._tokenize(state.texts[row] + self.config.protocol_delimiter)

    # ------------------------------------------------------------------ plain generation (no memory)
    def generate(self, messages, max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 stop: Optional[list] = None, seed: Optional[int] = None) -> GenerationResult:
        """The model as a plain chat LLM (no memory): the same generator a RAG baseline uses."""
        pieces = []
        stats = GenerationStats()
        t0 = time.perf_counter()
        for p in self.stream_generate(messages, max_new_tokens, temperature, stop, seed, stats=stats):
            pieces.append(p)
        return GenerationResult("".join(pieces), stats.prompt_tokens, stats.completion_tokens,
                                {"prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
                                 "first_token_s": stats.first_token_s, "total_s": time.perf_counter() - t0},
                                stats.finish_reason)

    def stream_generate(self, messages, max_new_tokens=None, temperature=None, stop=None, seed=None,
                        stats: Optional[GenerationStats] = None) -> Iterator[str]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        messages = _check_messages(messages)
        tok = self.model.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = self._tokenize("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")
        max_new = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        temp = self.config.temperature if temperature is None else temperature
        if len(ids) + max_new > self.model.max_positions:
            raise ValueError(f"the prompt ({len(ids)} tokens) plus {max_new} new tokens does not fit the model's "
                             f"window of {self.model.max_positions} tokens; shorten the messages")
        stats = stats if stats is not None else GenerationStats()
        yield from cut_at_stop(decode_stream(tok, generate_tokens(self.model, list(ids), max_new, temp, seed=seed,
                                                                  stats=stats)), stop, stats)

    # ------------------------------------------------------------------ info
    def info(self) -> dict:
        s = self.memory.state
        return {"model": self.name, "routing_layers": self.routing_layers, "router": self.router.fingerprint(),
                "documents": len(s), "chunks": s.n_chunks, "tokens": sum(s.n_tokens), "bytes": self.memory.nbytes,
                "chunk_size": self.config.chunk_size, "score": self.config.score}


def check_router(router, layers: list, model: DecoderModel):
    """A trained router that fits this model and covers these routing layers, on the model's device."""
    missing = [l for l in layers if l not in router.layers]
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
    return router.to(model.device, torch.float32)


def cut_at_stop(pieces: Iterator[str], stop: Optional[list], stats: GenerationStats) -> Iterator[str]:
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


def check_text(value, what: str = "question") -> str:
    """A non-empty str, else the error every surface (engine, LlamaIndex, LangChain) gives for it."""
    if not isinstance(value, str):
        raise TypeError(f"the {what} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"the {what} is empty; ask something")
    return value


def _check_messages(messages) -> list:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m["content"], str):
            raise TypeError(f"message {i} content must be a str, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not out:
        raise ValueError("no messages to answer")
    return out
