"""Vectorised pooling, query folding and routing against plain-loop references."""

import math

import pytest
import torch
import torch.nn.functional as F

from msa_plugins.engine.encoding import normalise_heads, pool_chunks
from msa_plugins.engine.bank import BankState
from msa_plugins.engine.routing import route
from msa_plugins.kernels.routing import fold_queries


def pool_naive(x, P):
    out = []
    for start in range(0, x.shape[0], P):
        chunk = x[start:start + P].double()
        out.append(sum(chunk[i] for i in range(chunk.shape[0])) / chunk.shape[0])
    return torch.stack(out).float()


@pytest.mark.parametrize("S,P", [(1, 4), (4, 4), (7, 4), (9, 1), (130, 64)])
def test_pool_chunks_matches_loop_including_partial_last_chunk(S, P):
    x = torch.randn(S, 3, 5)
    got = pool_chunks(x, P)
    assert got.shape == (math.ceil(S / P), 3, 5)
    torch.testing.assert_close(got, pool_naive(x, P), atol=1e-6, rtol=1e-6)


def route_naive(q_heads, keys_heads, chunk_doc, n_docs, score, q_valid):
    """Plain loops over the MSA paper, section 3: per-head score, head mean (GQA), max over valid question
    tokens, max over a document's chunks. q_heads [L, T, H, D], keys_heads [L, C, G, D] (raw)."""
    L, T, H, D = q_heads.shape
    G = keys_heads.shape[2]
    out = torch.full((L, n_docs), float("-inf"))
    for l in range(L):
        for c in range(keys_heads.shape[1]):
            best_t = float("-inf")
            for t in range(T):
                if not q_valid[t]:
                    continue
                s = 0.0
                for h in range(H):
                    g = h // (H // G)
                    a, b = q_heads[l, t, h].double(), keys_heads[l, c, g].double()
                    s += float(F.cosine_similarity(a, b, dim=0)) if score == "cosine" else float(a @ b) / math.sqrt(D)
                best_t = max(best_t, s / H)
            d = int(chunk_doc[c])
            out[l, d] = max(out[l, d], best_t)
    return out


@pytest.mark.parametrize("score", ["cosine", "dot"])
@pytest.mark.parametrize("H,G", [(4, 2), (6, 3), (4, 4)])
def test_route_matches_naive_with_gqa_question_mask_and_k_beyond_docs(score, H, G):
    torch.manual_seed(0)
    L, T, D = 2, 5, 8
    chunks_per_doc = [1, 3, 2, 1]
    C = sum(chunks_per_doc)
    chunk_doc = torch.repeat_interleave(torch.arange(len(chunks_per_doc)), torch.tensor(chunks_per_doc))
    q_heads = torch.randn(L, T, H, D)
    keys_heads = torch.randn(L, C, G, D)
    q_valid = [False, True, True, False, True]  # template tokens and padding excluded
    ref = route_naive(q_heads, keys_heads, chunk_doc, len(chunks_per_doc), score, q_valid)

    keys = keys_heads.reshape(L, C, G * D)
    if score == "cosine":
        keys = normalise_heads(keys, G)  # what the encoder stores
    q_fold = fold_queries(q_heads[:, torch.tensor(q_valid)], G, score)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.tensor(chunks_per_doc), 0)])
    ids = [f"d{i}" for i in range(len(chunks_per_doc))]
    state = BankState(ids=tuple(ids), texts=tuple(ids), metadata=({},) * 4, n_tokens=(1,) * 4, doc_start=starts,
                      chunk_doc=chunk_doc, keys_r=keys, keys=keys, values=keys,
                      row_of={d: i for i, d in enumerate(ids)})
    r = route(q_fold, state, [10, 11], k=10, backend="torch")  # k > number of documents
    agg = ref.mean(0)
    order = sorted(range(4), key=lambda d: -float(agg[d]))
    assert r.ids == [ids[d] for d in order]
    torch.testing.assert_close(torch.tensor(r.scores), agg[order].float(), atol=1e-5, rtol=1e-5)
    for i, layer in enumerate([10, 11]):
        lids, lscores = r.per_layer[layer]
        lorder = sorted(range(4), key=lambda d: -float(ref[i, d]))
        assert lids == [ids[d] for d in lorder]
        torch.testing.assert_close(torch.tensor(lscores), ref[i, lorder].float(), atol=1e-5, rtol=1e-5)
    # the allow-list is applied before top-k: only allowed documents come back
    r2 = route(q_fold, state, [10, 11], k=2, allow_ids=["d1", "d3"], backend="torch")
    assert set(r2.ids) == {"d1", "d3"}
    assert all(set(v[0]) <= {"d1", "d3"} for v in r2.per_layer.values())
