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
obviously-correct version the tests compare it with.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputTooLongError

# the UPR prompt, split where the passage and the question go (raw text: base and instruct models alike)
PASSAGE_PREFIX = "Passage: "
QUESTION_PROMPT = "\nPlease write a question based on this passage.\nQuestion:"
MAX_PASSAGE_TOKENS = 320  # a longer passage is cut: its start is what the question is scored against
PAIR_PASSAGE_TOKENS = 2 * MAX_PASSAGE_TOKENS  # path scoring: the anchor and a candidate, cut as one passage
PAIR_SEPARATOR = "\n\n"
MIN_PASSAGE_TOKENS = 16  # a question so long that less of a document fits is refused, not scored on a stub


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


@torch.inference_mode()
def question_likelihood(model, tokenizer, question: str, passages: list,
                        max_passage_tokens: int = MAX_PASSAGE_TOKENS, batch_tokens: int = 8192) -> list:
    """`question_likelihood_reference`, batched: rows left-padded so every row ends with the question's Tq tokens
    (their positions start at 0 at each row's first real token), `batch_tokens` tokens per forward."""
    if not passages:
        return []
    q_ids, prefixes = _encode(model, tokenizer, question, passages, max_passage_tokens)
    Tq = len(q_ids)
    target = torch.tensor(q_ids, dtype=torch.long, device=model.device)
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))  # similar lengths batch together
    out: list = [0.0] * len(prefixes)
    start = 0
    while start < len(order):
        rows = [order[start]]
        while start + len(rows) < len(order):  # rows are sorted by length: the next one is the longest yet
            nxt = order[start + len(rows)]
            if (len(rows) + 1) * (len(prefixes[nxt]) + Tq) > batch_tokens:
                break
            rows.append(nxt)
        start += len(rows)
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
           "MAX_PASSAGE_TOKENS", "PAIR_PASSAGE_TOKENS"]
