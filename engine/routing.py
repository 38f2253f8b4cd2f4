"""Routing: which documents each routing layer reads (MSA section 3), and one ranking across layers.

Per layer l: doc[l, d] = max over d's chunks of max over question tokens of the head-mean score
(cosine by default, scaled dot as an option). Each layer takes its own top-k (the faithful sparse path);
the aggregated ranking averages doc scores over layers (the interleave path and retrieval metrics).
An allow-list of documents (metadata filters) is applied before top-k, so filtered-out documents are
never selected. Scoring itself is `msa_plugins.kernels.doc_scores`: Triton on CUDA, PyTorch elsewhere.

Hybrid routing fuses the router's layer-mean ranking with the BM25 ranking of the memory's
lexical index (`lexical.py`), both restricted to the same allow-list before fusion:
    "rrf"   reciprocal rank fusion, score(d) = sum over rankings of 1 / (RRF_K + rank(d)), rank from 1
    "zsum"  calibrated score sum: each ranking's scores z-normalised over its own candidates, summed
            (a candidate missing from one ranking gets that ranking's lowest z-score)
"zsum" is the default (`MSAConfig.hybrid_fusion`): measured once on HotpotQA's dev questions against
"rrf", then fixed for every corpus (docs/results/hybrid_routing.md). Each ranking contributes its top
`max(k, FUSION_DEPTH)` candidates; BM25 candidates must share a term
with the question (score > 0). Ties break by the lower bank row, as everywhere in routing.

Routing in rounds (multi-hop) reads what earlier rounds found (`MSAConfig.round_routing`):
    "chain"   a beam over document chains (MDR, Xiong et al. 2021): each document found in the last round
              routes the question with its chain's texts as context; a candidate's chain score is its parent's
              chain score plus its own z-normalised score in the parent's ranking, and its best parent counts
              (`extend_chains`). A round-1 document's chain score is its z-score in the question's ranking.
    "concat"  one routing of the question with the text of every document found so far as context.
"chain" is the default: it finds more gold passages than "concat" on HotpotQA (11 questions better, 1 worse,
hybrid routing) and about as many on MuSiQue (docs/results/hybrid_routing.md, stop 15).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..kernels.routing import doc_scores, route_topk, topk_docs
from .bank import BankState


FUSIONS = ("rrf", "zsum")
RRF_K = 60  # the constant of Cormack et al. (2009); not tuned
FUSION_DEPTH = 100  # candidates each ranking contributes to a fusion (and to a chain's z-scores)
ROUND_ROUTINGS = ("chain", "concat")


@dataclass
class Routing:
    ids: list  # aggregated ranking, best first
    scores: list  # aggregated (layer-mean) scores; fused scores for hybrid routing
    rows: list  # bank rows of `ids`
    per_layer: dict = field(default_factory=dict)  # layer -> (ids, scores) of that layer's own top-k
    per_layer_rows: Optional[torch.Tensor] = None  # [L, k'] bank rows selected by each routing layer
    router_scores: Optional[list] = None  # the router's own layer-mean top scores (abstention reads them)

    def __post_init__(self):
        if self.router_scores is None:
            self.router_scores = list(self.scores)

    def top(self, k: int) -> "Routing":
        """This routing cut to its best k: what routing with k gives (every ranking, the aggregated one and each
        layer's, is best first, ties by the lower row), without routing again."""
        return Routing(self.ids[:k], self.scores[:k], self.rows[:k],
                       {layer: (ids[:k], scores[:k]) for layer, (ids, scores) in self.per_layer.items()},
                       None if self.per_layer_rows is None else self.per_layer_rows[:, :k].contiguous(),
                       self.router_scores[:k])


def allow_mask(state: BankState, allow_ids) -> Optional[torch.Tensor]:
    if allow_ids is None:
        return None
    mask = torch.zeros(len(state), dtype=torch.bool)
    for d in allow_ids:
        r = state.row_of.get(d)
        if r is not None:
            mask[r] = True
    return mask


def route(q_fold: torch.Tensor, state: BankState, routing_layers: list, k: int, allow_ids=None,
          backend: str = "auto", doc_score: str = "maxmax") -> Routing:
    """q_fold [L, T, G*D] (question tokens only) against the bank snapshot `state`.

    Scoring and both top-k selections (per layer, and over the layer mean) run where the keys live; only
    the [L + 1, k] selections come back to the host, in one copy (on CUDA nothing else synchronises).
    """
    n = len(state)
    if n == 0:
        return Routing([], [], [], {l: ([], []) for l in routing_layers}, torch.zeros(len(routing_layers), 0, dtype=torch.long))
    keys = state.keys_r
    allow = allow_mask(state, allow_ids)
    chunk_doc = state.chunk_doc.to(keys.device)  # no copy: the bank keeps chunk_doc beside the routing keys
    scores = doc_scores(q_fold.to(keys.device), keys, chunk_doc, n, backend=backend,
                        keys_scale=state.keys_r_scale, doc_score=doc_score)  # [L, N]
    layer_vals, layer_rows, agg_vals, agg_rows = route_topk(scores.float(), k, allow)  # [L, k'], [k']
    per_layer = {l: ([state.ids[int(r)] for r in layer_rows[i]], layer_vals[i].tolist())
                 for i, l in enumerate(routing_layers)}
    rows = agg_rows.tolist()
    return Routing([state.ids[r] for r in rows], agg_vals.tolist(), rows, per_layer, layer_rows)


def lexical_topk(state: BankState, question: str, k: int, allow_ids=None) -> tuple:
    """BM25 top-k of the state's lexical index among the allowed rows that share a term with `question`:
    (rows, scores), best first (ties: lower row)."""
    if len(state) == 0 or state.lexical is None:
        return [], []
    scores = state.lexical.scores(question)  # [N] float32
    ok = scores > 0
    allow = allow_mask(state, allow_ids)
    if allow is not None:
        ok &= allow
    vals, rows = topk_docs(scores, k, ok)
    return rows.tolist(), vals.tolist()


def fuse(rankings: list, k: int, fusion: str = "rrf") -> tuple:
    """Fuse rankings [(rows, scores), ...] (each best first) into the top k: (rows, fused scores)."""
    fused: dict = {}
    if fusion == "rrf":
        for rows, _ in rankings:
            for rank, r in enumerate(rows, 1):
                fused[r] = fused.get(r, 0.0) + 1.0 / (RRF_K + rank)
    elif fusion == "zsum":
        normed = []
        for rows, scores in rankings:
            if not rows:
                continue
            z = zscores(scores)
            normed.append((dict(zip(rows, z)), min(z)))
        for r in {r for rows, _ in rankings for r in rows}:
            fused[r] = sum(z.get(r, floor) for z, floor in normed)
    else:
        raise ValueError(f"unknown fusion {fusion!r}; use one of {FUSIONS}")
    best = sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]
    return [r for r, _ in best], [s for _, s in best]


def zscores(scores) -> list:
    """Scores z-normalised over their own list (mean 0, population std 1; a single score is 0)."""
    t = torch.tensor(list(scores), dtype=torch.float64)
    if len(t) < 2:
        return [0.0] * len(t)
    return ((t - t.mean()) / t.std(unbiased=False).clamp_min(1e-12)).tolist()


@dataclass
class ChainLink:
    """A document a routing round added to a chain: its bank row, its score in the ranking that found it
    (routed with its parent's texts), its chain score, and the index of its parent among that round's parents."""
    row: int
    score: float
    chain: float
    parent: int


def extend_chains(parents: list, k: int) -> list:
    """The next round of a beam over document chains. `parents`: one (chain score, rows, scores) per document
    found in the last round, rows/scores being the ranking routed with that document's chain as context
    (best first). A candidate's chain score through a parent = the parent's chain score + the candidate's
    z-score within that parent's ranking; the best parent counts (ties: the earlier parent). Returns the top k
    `ChainLink`s, best chain first, ties by the lower bank row."""
    best: dict = {}
    for p, (chain, rows, scores) in enumerate(parents):
        for row, score, z in zip(rows, scores, zscores(scores)):
            link = ChainLink(int(row), float(score), float(chain) + z, p)
            if row not in best or link.chain > best[row].chain:
                best[row] = link
    return sorted(best.values(), key=lambda x: (-x.chain, x.row))[:k]


def hybrid_route(q_fold: torch.Tensor, state: BankState, routing_layers: list, question: str, k: int,
                 allow_ids=None, backend: str = "auto", doc_score: str = "maxmax", fusion: str = "zsum",
                 depth: int = FUSION_DEPTH) -> Routing:
    """The router's ranking fused with BM25's (see the module doc). Every routing layer then reads the
    fused top-k (sparse mode), and `per_layer` reports that selection for each layer."""
    n_cand = max(k, depth)
    msa = route(q_fold, state, routing_layers, n_cand, allow_ids=allow_ids, backend=backend, doc_score=doc_score)
    lex_rows, lex_scores = lexical_topk(state, question, n_cand, allow_ids)
    rows, scores = fuse([(msa.rows, msa.scores), (lex_rows, lex_scores)], k, fusion)
    ids = [state.ids[r] for r in rows]
    L = len(routing_layers)
    return Routing(ids, scores, rows, {l: (list(ids), list(scores)) for l in routing_layers},
                   torch.tensor(rows, dtype=torch.long).view(1, -1).expand(L, -1).contiguous(),
                   router_scores=list(msa.scores[:k]))
