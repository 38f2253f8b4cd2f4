"""Reranking routed documents with the engine's own model: how likely is the question, given the document?

UPR (Sachan et al. 2022, "Improving Passage Retrieval with Zero-Shot Question Generation"): a language model
scores a candidate passage p for a question q by the mean log-probability of q's tokens after a prompt that
holds p and asks for a question about it. No training, no labels, no second model: the generator that answers
also judges which routed documents hold the answer. It reads each candidate's text once per question, so it
reorders the router's top `depth` (a few tens), never the whole memory.

Path scoring (`MSAConfig.rerank_scoring="path"`, stop 32): a multi-hop question's later hop (the bridge entity's
page) rarely shares the question's words, so alone it explains the question poorly. The candidate the single
fused score ranks first is the anchor, and every candidate (the anchor too: then the anchor twice) is also scored
with the anchor's text in front of it (`pair_texts`); the three z-scores are summed. One more forward per
candidate, each about twice as long (`PAIR_PASSAGE_TOKENS`).

`question_likelihood` is the batched path (left-padded rows, one forward per batch, the LM head on the
question's tokens only); `question_likelihood_reference` scores one passage at a time, with no padding: the
obviously-correct version the tests compare it with. Prompts that share a long start (path scoring's anchor) run
that start once and attend to its cached keys/values (`_likelihood_after_shared_prefix`), compared with the same
reference.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import InputTooLongError, InvalidArgumentError
from .model import KVCache

# the UPR prompt, split where the passage and the question go (raw text: base and instruct models alike)
PASSAGE_PREFIX = "Passage: "
QUESTION_PROMPT = "\nPlease write a question based on this passage.\nQuestion:"
MAX_PASSAGE_TOKENS = 320  # a longer passage is cut: its start is what the question is scored against
PAIR_PASSAGE_TOKENS = 2 * MAX_PASSAGE_TOKENS  # path scoring: the anchor and a candidate, cut as one passage
PAIR_SEPARATOR = "\n\n"
MIN_PASSAGE_TOKENS = 16  # a question so long that less of a document fits is refused, not scored on a stub
# prompts sharing a start at least this long run it once (path scoring's anchor); below it, one more forward per
# batch costs more than it saves (every prompt shares "Passage:")
SHARED_PREFIX_MIN_TOKENS = 32


def _encode(model, tokenizer, question: str, passages: list, max_passage_tokens: int) -> tuple:
    """-> (question ids [Tq], one prompt's ids per passage: prefix + passage (cut) + question prompt). The passage
    is cut further when a long question would otherwise push a row past the model's positions."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    q_ids = ids(" " + question.strip())
    prompt = ids(QUESTION_PROMPT)
    limit = getattr(model, "max_positions", None)
    if limit is not None:
        n_prefix = len(ids(PASSAGE_PREFIX))
        room = limit - len(prompt) - len(q_ids) - n_prefix
        if room < MIN_PASSAGE_TOKENS:
            raise InputTooLongError(f"the question has {len(q_ids)} tokens: with the rerank prompt that leaves {room} "
                                    f"of the model's {limit} positions for a document; shorten it, or drop rerank")
        max_passage_tokens = min(max_passage_tokens, room + n_prefix)
    return q_ids, [ids(PASSAGE_PREFIX + p)[:max_passage_tokens] + prompt for p in passages]


@torch.inference_mode()
def _question_logprob(model, prefix: list, q_ids: list) -> float:
    ids = torch.tensor([prefix + q_ids], dtype=torch.long)
    positions = torch.arange(ids.shape[1])[None]
    h = model.forward(ids, positions, logits="none")  # [1, S, hidden]
    logp = model.lm_head(h[0, len(prefix) - 1:-1]).float().log_softmax(-1)  # [Tq, vocab]: predicts q's tokens
    return logp.gather(-1, torch.tensor(q_ids, device=logp.device)[:, None]).mean().item()


def question_likelihood_reference(model, tokenizer, question: str, passages: list,
                                  max_passage_tokens: int = MAX_PASSAGE_TOKENS) -> list:
    """Mean log P(question tokens | UPR prompt with the passage), one passage at a time."""
    q_ids, prefixes = _encode(model, tokenizer, question, passages, max_passage_tokens)
    return [_question_logprob(model, prefix, q_ids) for prefix in prefixes]


def _batches(lengths: list, batch_tokens: int):
    """Row indices in batches of similar lengths (shortest first), each at most `batch_tokens` tokens once padded
    to its longest row (a row longer than the budget goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    start = 0
    while start < len(order):
        rows = [order[start]]
        while start + len(rows) < len(order):  # rows are sorted by length: the next one is the longest yet
            nxt = order[start + len(rows)]
            if (len(rows) + 1) * lengths[nxt] > batch_tokens:
                break
            rows.append(nxt)
        start += len(rows)
        yield rows


def shared_prefix_enabled() -> bool:
    """MSA_RERANK_PREFIX: "shared" (default) runs a start the prompts share once; "off" runs every prompt whole,
    the path from before, kept for `benchmarks/rerank_prefix.py` to measure against."""
    kind = os.environ.get("MSA_RERANK_PREFIX", "shared")
    if kind not in ("shared", "off"):
        raise InvalidArgumentError(f"MSA_RERANK_PREFIX={kind!r}; use 'shared' or 'off'")
    return kind == "shared"


def shared_prefix_length(prefixes: list) -> int:
    """How many leading tokens every prompt shares, leaving each at least one of its own: the position that
    predicts the question's first token must be in every row's own part."""
    if len(prefixes) < 2:
        return 0
    n = min(len(p) for p in prefixes) - 1
    first = prefixes[0]
    for i in range(n):
        if any(p[i] != first[i] for p in prefixes[1:]):
            return i
    return max(n, 0)


@torch.inference_mode()
def question_likelihood(model, tokenizer, question: str, passages: list,
                        max_passage_tokens: int = MAX_PASSAGE_TOKENS, batch_tokens: int = 8192) -> list:
    """`question_likelihood_reference`, batched: rows left-padded so every row ends with the question's Tq tokens
    (their positions start at 0 at each row's first real token), `batch_tokens` tokens per forward. When the
    prompts share a start of at least `SHARED_PREFIX_MIN_TOKENS` tokens (path scoring: the anchor), that start
    runs once (`_likelihood_after_shared_prefix`)."""
    if not passages:
        return []
    q_ids, prefixes = _encode(model, tokenizer, question, passages, max_passage_tokens)
    shared = shared_prefix_length(prefixes)
    if shared >= SHARED_PREFIX_MIN_TOKENS and shared_prefix_enabled():
        return _likelihood_after_shared_prefix(model, q_ids, prefixes, shared, batch_tokens)
    Tq = len(q_ids)
    target = torch.tensor(q_ids, dtype=torch.long, device=model.device)
    out: list = [0.0] * len(prefixes)
    for rows in _batches([len(p) + Tq for p in prefixes], batch_tokens):
        S = max(len(prefixes[i]) for i in rows) + Tq
        ids = torch.zeros(len(rows), S, dtype=torch.long)
        real = torch.zeros(len(rows), S, dtype=torch.bool)
        for b, i in enumerate(rows):
            seq = prefixes[i] + q_ids
            ids[b, S - len(seq):] = torch.tensor(seq, dtype=torch.long)
            real[b, S - len(seq):] = True
        positions = (real.long().cumsum(1) - 1).clamp(min=0)  # [B, S]: 0 at each row's first real token
        h = model.forward(ids, positions, key_padding=real, logits="none")  # [B, S, hidden]
        logp = model.lm_head(h[:, S - Tq - 1:-1]).float().log_softmax(-1)  # [B, Tq, vocab]
        scores = logp.gather(-1, target[None, :, None].expand(len(rows), -1, -1))[..., 0].mean(1)  # [B]
        for b, i in enumerate(rows):
            out[i] = scores[b].item()
    return out


@torch.inference_mode()
def _likelihood_after_shared_prefix(model, q_ids: list, prefixes: list, shared: int, batch_tokens: int) -> list:
    """`question_likelihood` for prompts that all start with the same `shared` tokens. Those run once; their
    keys/values (rotated at positions 0..shared-1) become every row's cache prefix, which a row's own tokens attend
    to in full, as they would to the same tokens in front of them. Path scoring's rows are the anchor's text and
    then a candidate's: this skips recomputing the anchor once per candidate. Rows are right-padded (harmless
    under the causal mask), so each row's question tokens are gathered at its own offset."""
    Tq = len(q_ids)
    head = torch.tensor([prefixes[0][:shared]], dtype=torch.long)
    prefix_cache = KVCache(model.n_layers, preallocated=False)
    model.forward(head, torch.arange(shared)[None], cache=prefix_cache, logits="none")  # fills k/v [1, G, shared, D]
    target = torch.tensor(q_ids, dtype=torch.long, device=model.device)
    tails = [p[shared:] + q_ids for p in prefixes]  # each row's own tokens (>= 1 before the question), the question
    out: list = [0.0] * len(prefixes)
    for rows in _batches([len(t) for t in tails], batch_tokens):
        B, S = len(rows), max(len(tails[i]) for i in rows)
        ids = torch.zeros(B, S, dtype=torch.long)
        for b, i in enumerate(rows):
            ids[b, :len(tails[i])] = torch.tensor(tails[i], dtype=torch.long)
        positions = (shared + torch.arange(S))[None].expand(B, -1)  # [B, S]: right after the shared start
        cache = KVCache(model.n_layers, preallocated=False,
                        memory=[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))  # [B, G, shared, D], no copy
                                for k, v in zip(prefix_cache.k, prefix_cache.v)])
        h = model.forward(ids, positions, cache=cache, logits="none")  # [B, S, hidden]
        # row b's question tokens sit at own positions n_b - Tq .. n_b - 1, predicted by the position before each
        first = torch.tensor([len(tails[i]) - Tq - 1 for i in rows])  # [B]
        at = (first[:, None] + torch.arange(Tq)[None]).to(h.device)  # [B, Tq]
        hq = h.gather(1, at[..., None].expand(-1, -1, h.shape[-1]))  # [B, Tq, hidden]
        logp = model.lm_head(hq).float().log_softmax(-1)  # [B, Tq, vocab]
        scores = logp.gather(-1, target[None, :, None].expand(B, -1, -1))[..., 0].mean(1)  # [B]
        for b, i in enumerate(rows):
            out[i] = scores[b].item()
    return out


def fuse_with_routing(route_scores: list, *likelihoods: list) -> list:
    """One score per candidate: the sum of its z-scored routing score and z-scored question likelihoods (each
    within the candidates), so no signal's scale decides alone."""
    def z(xs):
        t = torch.tensor(xs, dtype=torch.float64)
        sd = t.std(unbiased=False)
        return (t - t.mean()) / (sd if sd > 0 else 1.0)
    return sum((z(x) for x in likelihoods), z(route_scores)).tolist()


def pair_texts(anchor: str, passages: list) -> list:
    """Path scoring's passages: the anchor's text, then each candidate's."""
    return [anchor + PAIR_SEPARATOR + p for p in passages]


__all__ = ["question_likelihood", "question_likelihood_reference", "fuse_with_routing", "pair_texts",
           "shared_prefix_length", "MAX_PASSAGE_TOKENS", "PAIR_PASSAGE_TOKENS", "SHARED_PREFIX_MIN_TOKENS"]
