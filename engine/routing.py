"""Routing: which documents each routing layer reads (MSA section 3), and one ranking across layers.

Per layer l: doc[l, d] = max over d's chunks of max over question tokens of the head-mean score
(cosine by default, scaled dot as an option). Each layer takes its own top-k (the faithful sparse path);
the aggregated ranking averages doc scores over layers (the interleave path and retrieval metrics).
An allow-list of documents (metadata filters) is applied before top-k, so filtered-out documents are
never selected. Scoring itself is `msa_plugins.kernels.doc_scores`: Triton on CUDA, PyTorch elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..kernels.routing import doc_scores, route_topk
from .bank import BankState


@dataclass
class Routing:
    ids: list  # aggregated ranking, best first
    scores: list  # aggregated (layer-mean) scores
    rows: list  # bank rows of `ids`
    per_layer: dict = field(default_factory=dict)  # layer -> (ids, scores) of that layer's own top-k
    per_layer_rows: Optional[torch.Tensor] = None  # [L, k'] bank rows selected by each routing layer


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
          backend: str = "auto") -> Routing:
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
                        keys_scale=state.keys_r_scale)  # [L, N]
    layer_vals, layer_rows, agg_vals, agg_rows = route_topk(scores.float(), k, allow)  # [L, k'], [k']
    per_layer = {l: ([state.ids[int(r)] for r in layer_rows[i]], layer_vals[i].tolist())
                 for i, l in enumerate(routing_layers)}
    rows = agg_rows.tolist()
    return Routing([state.ids[r] for r in rows], agg_vals.tolist(), rows, per_layer, layer_rows)
