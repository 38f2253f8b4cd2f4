"""Prompts and token generation over our decoder forward, with or without sparse memory.

`sparse` mode (MSA section 4): each routing layer's KV cache starts with the pooled K̄/V̄ chunks of the
documents that layer selected; lower layers have none. The prompt's positions start at k (the selected
documents count as k slots before it), so pooled keys keep the rotation of their document-local
positions. `interleave` mode builds a prompt with the original text of the routed documents instead
and generates with no memory in the cache.
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from ..config import DEFAULT_PROMPT_STYLE, PROMPT_STYLES
from ..errors import InvalidArgumentError
from .model import DecoderModel, KVCache

QUESTION_SENTINEL = "\u2063MSA_QUESTION\u2063"


@dataclass
class Prompt:
    ids: list
    question_mask: list  # True on the question's own tokens (not template, not injected context)


def build_prompt(model: DecoderModel, question: str, system: Optional[str] = None, context: str = "",
                 history: Optional[list] = None, after: str = "") -> Prompt:
    """Chat-template prompt with the question tokens marked. `context` (injected documents) goes before
    the question inside the user turn, `after` (e.g. "\nAnswer: ") after it, still inside the user turn.
    Template, context, question and `after` are tokenized separately and joined, so the question mask
    is exact."""
    tok = model.tokenizer
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.extend(history or [])
    messages.append({"role": "user", "content": QUESTION_SENTINEL})
    if getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # a base model without a template: plain text
        rendered = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + f"{QUESTION_SENTINEL}\nAnswer:"
    prefix, suffix = rendered.split(QUESTION_SENTINEL)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    pre_ids = enc(prefix + context)
    q_ids = enc(question)
    suf_ids = enc(after + suffix)
    bos = getattr(tok, "bos_token_id", None)
    if bos is not None and getattr(tok, "add_bos_token", False) and (not pre_ids or pre_ids[0] != bos):
        pre_ids = [bos] + pre_ids
    return Prompt(pre_ids + q_ids + suf_ids, [False] * len(pre_ids) + [True] * len(q_ids) + [False] * len(suf_ids))


# The prompt styles are described with PROMPT_STYLES in msa_plugins/config.py.
LLAMAINDEX_QA_SYSTEM = (
    "You are an expert Q&A system that is trusted around the world.\n"
    "Always answer the query using the provided context information, and not prior knowledge.\n"
    "Some rules to follow:\n"
    "1. Never directly reference the given context in your answer.\n"
    "2. Avoid statements like 'Based on the context, ...' or 'The context information ...' or anything along "
    "those lines.")
_LLAMAINDEX_RULE = "---------------------"


def _style(style: Optional[str]) -> str:
    style = style or DEFAULT_PROMPT_STYLE
    if style not in PROMPT_STYLES:
        raise InvalidArgumentError(f"unknown prompt style {style!r}; use one of {PROMPT_STYLES}")
    return style


def context_block(texts: list, style: Optional[str] = None) -> str:
    """The prompt text that goes before the question (inside the user turn) for these documents."""
    style = _style(style)
    if style == "msa":
        parts = [f"[{i + 1}] {t.strip()}" for i, t in enumerate(texts)]
        return "Use the following documents to answer.\n\n" + "\n\n".join(parts) + "\n\nQuestion: "
    return (f"Context information is below.\n{_LLAMAINDEX_RULE}\n" + "\n\n".join(texts) + f"\n{_LLAMAINDEX_RULE}\n"
            "Given the context information and not prior knowledge, answer the query.\nQuery: ")


def context_suffix(style: Optional[str] = None) -> str:
    """The prompt text that follows the question inside the user turn."""
    return "" if _style(style) == "msa" else "\nAnswer: "


def style_system_prompt(style: Optional[str] = None) -> Optional[str]:
    """The style's system prompt (None: the chat template's default)."""
    return LLAMAINDEX_QA_SYSTEM if _style(style) == "llamaindex" else None


def context_prompt(model: DecoderModel, question: str, texts: list, style: Optional[str] = None,
                   system: Optional[str] = None, history: Optional[list] = None) -> Prompt:
    """The interleave-mode prompt: `texts` (routed or retrieved documents) shown in `style`; `system`
    (when not None) replaces the style's system prompt."""
    style = _style(style)
    context = context_block(texts, style)
    if style != "msa" and context.endswith(" "):
        # "Query: " + question tokenized apart gives a lone " " token the model never sees in running text;
        # the space goes with the question (" What", as tokenizing the whole prompt does). The "msa" style
        # keeps its original tokenization so that its answers stay reproducible.
        context, question = context[:-1], " " + question
    return build_prompt(model, question, system=system if system is not None else style_system_prompt(style),
                        context=context, history=history, after=context_suffix(style))


def stop_token_ids(model: DecoderModel) -> set:
    tok = model.tokenizer
    ids = set()
    for t in (tok.eos_token_id, getattr(model.config, "eos_token_id", None)):
        if isinstance(t, int):
            ids.add(t)
        elif isinstance(t, (list, tuple)):
            ids.update(t)
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"):
        tid = tok.convert_tokens_to_ids(name) if name in tok.get_vocab() else None
        if isinstance(tid, int):
            ids.add(tid)
    return ids


def sparse_memory(state, per_layer_rows: torch.Tensor, n_layers: int, routing_layers: list,
                  model: DecoderModel) -> list:
    """Per model layer: None, or (k [1, G, M, D], v [1, G, M, D]) of the chunks of the documents that
    routing layer selected (M = their chunk count)."""
    memory = [None] * n_layers
    G, D = model.n_kv_heads, model.head_dim
    for i, layer in enumerate(routing_layers):
        rows = per_layer_rows[i].tolist()
        if not rows:
            continue
        idx = torch.cat([torch.arange(*state.content_range(r)) for r in rows])
        # only the selected documents' chunks travel (from host memory or a memory map in the host tier)
        idx = idx.to(state.keys.device)
        k = state.keys[i].index_select(0, idx).to(model.device, non_blocking=True).to(model.dtype)  # [M, G*D]
        v = state.values[i].index_select(0, idx).to(model.device, non_blocking=True).to(model.dtype)
        M = idx.numel()
        memory[layer] = (k.view(M, G, D).transpose(0, 1)[None], v.view(M, G, D).transpose(0, 1)[None])
    return memory


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float = 0.0
    finish_reason: str = "length"
    token_ids: list = field(default_factory=list)

    def add(self, other: "GenerationStats") -> None:
        """Fold a later segment of the same answer (protocol mode generates in segments) into this one."""
        self.prompt_tokens = self.prompt_tokens or other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.prefill_s += other.prefill_s
        self.decode_s += other.decode_s
        self.first_token_s = self.first_token_s or other.first_token_s
        self.finish_reason = other.finish_reason
        self.token_ids.extend(other.token_ids)

    def timings(self, total_s: float, routing_s: Optional[float] = None) -> dict:
        """The timings dict of a result (the only place it is built). With routing, the first token's time
        counts from the question, routing included."""
        out = {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "first_token_s": self.first_token_s,
               "total_s": total_s}
        if routing_s is not None:
            out = {"routing_s": routing_s, **out, "first_token_s": routing_s + self.first_token_s}
        return out


# Continuous batching: while a `BatchScheduler` (engine/batching.py) is attached to a model, every
# `generate_tokens` call on it joins that scheduler's running batch instead of decoding alone.
_SCHEDULERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def attach_scheduler(model: DecoderModel, scheduler) -> None:
    """Route this model's generation through `scheduler` (one per model)."""
    if _SCHEDULERS.get(model) not in (None, scheduler):
        raise InvalidArgumentError("this model already has a batch scheduler attached; stop it first")
    _SCHEDULERS[model] = scheduler


def has_scheduler(model: DecoderModel) -> bool:
    """Whether this model's generation already runs through a batch scheduler."""
    return _SCHEDULERS.get(model) is not None


def detach_scheduler(model: DecoderModel, scheduler) -> None:
    if _SCHEDULERS.get(model) is scheduler:
        del _SCHEDULERS[model]


def kv_cache_kind() -> str:
    """MSA_KV_CACHE: "preallocated" (default) or "cat", the per-token concatenating cache from before,
    kept as the reference that benchmarks/batch_decode.py measures against."""
    kind = os.environ.get("MSA_KV_CACHE", "preallocated")
    if kind not in ("preallocated", "cat"):
        raise InvalidArgumentError(f"MSA_KV_CACHE={kind!r}; use 'preallocated' or 'cat'")
    return kind


class Sampler:
    """Picks the next token from logits: argmax at temperature 0, else a draw from this request's own
    generator (seeded, or freshly seeded: never the global RNG). The same code for a request decoded
    alone and in a batch, so both pick the same tokens from the same logits."""

    def __init__(self, temperature: float = 0.0, seed: Optional[int] = None):
        self.temperature = temperature
        self.gen = None
        if temperature > 0:
            self.gen = torch.Generator(device="cpu")
            if seed is not None:
                self.gen.manual_seed(seed)
            else:
                self.gen.seed()

    def pick(self, logits: torch.Tensor) -> int:
        """logits [vocab] -> token id."""
        if self.temperature > 0:
            probs = torch.softmax(logits.float() / self.temperature, dim=-1).cpu()
            return int(torch.multinomial(probs, 1, generator=self.gen))
        return int(torch.argmax(logits))


def generate_tokens(model: DecoderModel, prompt_ids: list, max_new_tokens: int, temperature: float = 0.0,
                    memory: Optional[list] = None, position_offset: int = 0, seed: Optional[int] = None,
                    stats: Optional[GenerationStats] = None, stop_ids: Optional[set] = None) -> Iterator[int]:
    """Yield generated token ids one by one (greedy at temperature 0), filling `stats` as it goes.
    `memory`: per layer None or the (k, v) prefix of sparse mode; positions start at `position_offset`.
    Joins the model's batch scheduler when one is attached (same tokens, decoded with other requests)."""
    stats = stats if stats is not None else GenerationStats()
    stop_ids = stop_token_ids(model) if stop_ids is None else stop_ids
    scheduler = _SCHEDULERS.get(model)
    if scheduler is not None:
        return scheduler.tokens(prompt_ids, max_new_tokens, Sampler(temperature, seed), memory=memory,
                                position_offset=position_offset, stats=stats, stop_ids=stop_ids)
    return _generate_alone(model, prompt_ids, max_new_tokens, Sampler(temperature, seed), memory, position_offset,
                           stats, stop_ids)


def _generate_alone(model, prompt_ids, max_new_tokens, sampler, memory, position_offset, stats, stop_ids):
    t0 = time.perf_counter()
    n_memory = max((m[0].shape[2] for m in memory or [] if m is not None), default=0)
    # room for the memory prefix, the prompt and every new token: decoding never reallocates
    cache = KVCache(model.n_layers, memory=list(memory) if memory else [],
                    capacity=n_memory + len(prompt_ids) + max_new_tokens,
                    preallocated=kv_cache_kind() == "preallocated")
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    pos = position_offset + torch.arange(len(prompt_ids))[None]
    logits = model.forward(ids, pos, cache=cache)
    stats.prompt_tokens = len(prompt_ids)
    stats.prefill_s = time.perf_counter() - t0
    next_pos = position_offset + len(prompt_ids)
    t1 = time.perf_counter()
    try:
        yield from _decode_loop(model, logits, cache, next_pos, max_new_tokens, sampler, stop_ids, stats, t0)
    finally:  # also when the consumer stops early (a stop string, a closed stream)
        stats.decode_s = time.perf_counter() - t1


def _decode_loop(model, logits, cache, next_pos, max_new_tokens, sampler, stop_ids, stats, t0):
    for step in range(max_new_tokens):
        tok = sampler.pick(logits[0])
        if step == 0:
            stats.first_token_s = time.perf_counter() - t0
        if tok in stop_ids:
            stats.finish_reason = "stop"
            break
        stats.completion_tokens += 1
        stats.token_ids.append(tok)
        yield tok
        if step == max_new_tokens - 1:
            break
        logits = model.forward(torch.tensor([[tok]]), torch.tensor([[next_pos]]), cache=cache)
        next_pos += 1


def decode_stream(tokenizer, token_iter: Iterator[int]) -> Iterator[str]:
    """Turn token ids into text pieces; holds back incomplete UTF-8 sequences (shown as U+FFFD)."""
    ids, sent = [], ""
    for t in token_iter:
        ids.append(t)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(sent):
            yield text[len(sent):]
            sent = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(sent):
        yield text[len(sent):]
