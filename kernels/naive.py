"""Reference routing (the MSA paper, section 3) written as plain loops.

Slow on purpose: every other backend (vectorised PyTorch, Triton, sharded) is tested against these
functions, so they must be obviously correct rather than fast. Use them on small shapes only.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

NEG_INF = float("-inf")


def _dequantized_chunk(keys: torch.Tensor, keys_scale: Optional[torch.Tensor], l: int, c: int) -> torch.Tensor:
    """Routing key of chunk c in layer l as float64 [G*D]; int8 keys are multiplied by their per-head scale."""
    k = keys[l, c].double()
    if keys_scale is None:
        return k
    G = keys_scale.shape[-1]
    return (k.view(G, -1) * keys_scale[l, c].double()[:, None]).reshape(-1)


def doc_scores_naive(q: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int,
                     keys_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """doc[l, d] = max over chunks c of d, max over tokens t, of q[l, t] . keys[l, c].

    q: [L, T, G*D] head-folded queries; keys: [L, C, G*D] (any float dtype, or int8 with keys_scale [L, C, G]);
    chunk_doc: [C]. Returns [L, n_docs] float32, -inf for documents that own no chunk.
    """
    L, C = keys.shape[0], keys.shape[1]
    T = q.shape[1]
    out = [[NEG_INF] * n_docs for _ in range(L)]
    for l in range(L):
        for c in range(C):
            k = _dequantized_chunk(keys, keys_scale, l, c)
            best = NEG_INF
            for t in range(T):
                best = max(best, float(torch.dot(q[l, t].double(), k)))
            d = int(chunk_doc[c])
            out[l][d] = max(out[l][d], best)
    return torch.tensor(out, dtype=torch.float32).view(L, n_docs)


def doc_scores_naive_late(q: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int,
                          keys_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Late interaction: doc[l, d] = mean over tokens t of the max over chunks c of d of q[l, t] . keys[l, c].

    Same arguments as `doc_scores_naive`; -inf for documents that own no chunk (and for every document
    when the question has no token)."""
    L, C = keys.shape[0], keys.shape[1]
    T = q.shape[1]
    out = [[NEG_INF] * n_docs for _ in range(L)]
    for l in range(L):
        for d in range(n_docs):
            chunks = [c for c in range(C) if int(chunk_doc[c]) == d]
            if not chunks or T == 0:
                continue
            total = 0.0
            for t in range(T):
                total += max(float(torch.dot(q[l, t].double(), _dequantized_chunk(keys, keys_scale, l, c)))
                             for c in chunks)
            out[l][d] = total / T
    return torch.tensor(out, dtype=torch.float32).view(L, n_docs)


def doc_scores_naive_heads(q_R: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int,
                           scoring: str = "cosine") -> torch.Tensor:
    """The section 3 definition before head folding, to check `fold_queries` against.

    q_R: [L, T, H, D] per-head routing queries; keys: [L, C, G, D] per-KV-head pooled routing keys (not
    necessarily normalised); GQA: query head h reads KV head h // (H / G). Score of (t, c) = mean over h of
    cos(q_R[t, h], K[c, g(h)]) for "cosine", or of q_R[t, h] . K[c, g(h)] / sqrt(D) for "dot".
    """
    L, T, H, D = q_R.shape
    C, G = keys.shape[1], keys.shape[2]
    per_group = H // G
    out = [[NEG_INF] * n_docs for _ in range(L)]
    for l in range(L):
        for c in range(C):
            best = NEG_INF
            for t in range(T):
                total = 0.0
                for h in range(H):
                    qv, kv = q_R[l, t, h].double(), keys[l, c, h // per_group].double()
                    if scoring == "cosine":
                        total += float(torch.dot(qv, kv) / (qv.norm() * kv.norm()))
                    else:
                        total += float(torch.dot(qv, kv)) / math.sqrt(D)
                best = max(best, total / H)
            d = int(chunk_doc[c])
            out[l][d] = max(out[l][d], best)
    return torch.tensor(out, dtype=torch.float32).view(L, n_docs)


def topk_naive(doc_scores: torch.Tensor, k: int, allow: Optional[torch.Tensor] = None):
    """Top-k documents per row by (higher score, then lower document id); -inf and disallowed never appear.

    doc_scores: [n_docs] or [L, n_docs]. Returns (values, indices) of shape [k'] or [L, k'] with
    k' = min(k, fewest valid documents in any row).
    """
    rows = doc_scores.view(-1, doc_scores.shape[-1]) if doc_scores.dim() > 1 else doc_scores.view(1, -1)
    ranked = []
    for row in rows.tolist():
        valid = [(-s, d) for d, s in enumerate(row)
                 if s > NEG_INF and (allow is None or bool(allow[d]))]
        ranked.append(sorted(valid))
    k_eff = min([k] + [len(r) for r in ranked])
    values = torch.tensor([[-s for s, _ in r[:k_eff]] for r in ranked], dtype=torch.float32).view(len(ranked), k_eff)
    indices = torch.tensor([[d for _, d in r[:k_eff]] for r in ranked], dtype=torch.int64).view(len(ranked), k_eff)
    if doc_scores.dim() == 1:
        return values[0], indices[0]
    return values, indices
