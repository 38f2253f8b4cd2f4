"""Memory parallel routing on torch.distributed (the MSA paper, section 7).

When the routing keys of a bank do not fit one accelerator, each rank holds the routing keys of a subset
of whole documents. The question's routing queries are the same on every rank (broadcast them first if
only one rank computes them); each rank scores its shard, keeps its local top-k per layer, and one
all_gather of k (score, global id) candidates per rank gives the global top-k. This is exact: a document
in the global top-k is also in its own rank's top-k under the same order. The order is "higher score,
then lower global id" everywhere, so every rank (and a single process holding the whole bank) returns
identical selections.

Content (pooled K/V or original text) stays with its owner rank; `fetch_content` moves only the selected
documents' rows.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..kernels import doc_scores, topk_docs

NEG_INF = float("-inf")


def _local_candidates(local_doc: torch.Tensor, local_doc_global_ids: torch.Tensor, k: int,
                      allow: Optional[torch.Tensor] = None):
    """Local top-k of rows of local_doc [R, n_local] under (score desc, global id asc), padded to k.

    allow: optional bool [n_local]; a document it excludes is never a candidate (filter before top-k).
    Returns (scores [R, k] float32, global ids [R, k] int64); padding is (-inf, -1) where the shard has
    fewer than k valid documents, so every rank contributes the same shape to the all_gather.
    """
    R = local_doc.shape[0]
    gids = local_doc_global_ids.to(device=local_doc.device, dtype=torch.int64)
    order = torch.argsort(gids)                     # columns in global-id order: topk_docs' tie-break = gid
    if allow is not None:
        allow = allow.to(device=local_doc.device, dtype=torch.bool)[order]
    vals, idx = topk_docs(local_doc[:, order], k, allow)
    scores = torch.full((R, k), NEG_INF, dtype=torch.float32, device=local_doc.device)
    ids = torch.full((R, k), -1, dtype=torch.int64, device=local_doc.device)
    scores[:, :vals.shape[1]] = vals
    ids[:, :vals.shape[1]] = gids[order][idx]
    return scores, ids


def _merge(all_scores: torch.Tensor, all_ids: torch.Tensor, k: int):
    """[R, N] candidates -> global top-k [R, k'] by (score desc, id asc); padding (-inf) is dropped."""
    by_id = torch.argsort(all_ids, dim=1, stable=True)
    s, i = all_scores.gather(1, by_id), all_ids.gather(1, by_id)
    by_score = torch.sort(s, dim=1, descending=True, stable=True).indices   # stable: ties keep id order
    s, i = s.gather(1, by_score), i.gather(1, by_score)
    n_valid = int((s > NEG_INF).sum(1).min()) if s.numel() else 0
    k_eff = min(k, n_valid)
    return s[:, :k_eff], i[:, :k_eff]


def _gather_candidates(scores: torch.Tensor, ids: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """all_gather [R, k] from every rank -> [R, world*k] (rank order; the merge does not depend on it)."""
    world = dist.get_world_size(group)
    s_list = [torch.empty_like(scores) for _ in range(world)]
    i_list = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(s_list, scores.contiguous(), group=group)
    dist.all_gather(i_list, ids.contiguous(), group=group)
    return torch.cat(s_list, dim=1), torch.cat(i_list, dim=1)


def sharded_route(q: torch.Tensor, local_keys: torch.Tensor, local_chunk_doc: torch.Tensor,
                  local_doc_global_ids: torch.Tensor, k: int, group=None, backend: str = "auto",
                  keys_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-layer global top-k over a bank sharded by documents across the ranks of `group`.

    q: [L, T, G*D] (identical on all ranks); local_keys: [L, C_local, G*D]; local_chunk_doc: [C_local]
    local document rows in [0, n_local); local_doc_global_ids: [n_local] int64 global id of each local row.
    Returns (scores [L, k'], global_doc_ids [L, k']), k' = min(k, valid documents in the whole bank),
    the same on every rank.
    """
    n_local = int(local_doc_global_ids.numel())
    local = doc_scores(q, local_keys, local_chunk_doc, n_local, backend=backend, keys_scale=keys_scale)
    scores, ids = _local_candidates(local, local_doc_global_ids, k)
    return _merge(*_gather_candidates(scores, ids, group), k)


def sharded_route_aggregated(q: torch.Tensor, local_keys: torch.Tensor, local_chunk_doc: torch.Tensor,
                             local_doc_global_ids: torch.Tensor, k: int, group=None, backend: str = "auto",
                             keys_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One global top-k over the layer-mean document score (the training-free / trained-router ranking).

    Same inputs as `sharded_route`; returns (scores [k'], global_doc_ids [k']). The mean is per document,
    so it is computed locally before the exchange (no cross-rank sum needed).
    """
    n_local = int(local_doc_global_ids.numel())
    local = doc_scores(q, local_keys, local_chunk_doc, n_local, backend=backend, keys_scale=keys_scale)
    scores, ids = _local_candidates(local.mean(0, keepdim=True), local_doc_global_ids, k)
    s, i = _merge(*_gather_candidates(scores, ids, group), k)
    return s[0], i[0]


def sharded_route_topk(q: torch.Tensor, local_keys: torch.Tensor, local_chunk_doc: torch.Tensor,
                       local_doc_global_ids: torch.Tensor, k: int, group=None, backend: str = "auto",
                       keys_scale: Optional[torch.Tensor] = None, allow: Optional[torch.Tensor] = None,
                       doc_score: str = "maxmax"):
    """Both selections of `kernels.route_topk` (per layer, and over the layer mean) over a sharded bank,
    from one scoring pass and one exchange: what single-process routing returns, on every rank.

    Same inputs as `sharded_route`, plus allow: optional bool [n_local] allow-list of the local rows
    (applied before the local top-k, so a filtered-out document is never selected) and the document
    score rule (`kernels.doc_scores`). Returns (layer scores [L, k'], layer global ids [L, k'],
    mean scores [k''], mean global ids [k'']), k' = min(k, fewest valid documents in any layer) and
    k'' = min(k, valid documents), as `route_topk` trims them. The layer mean is per document, so each
    rank takes it over its own columns, as the single-process mean over all of them.
    """
    n_local = int(local_doc_global_ids.numel())
    local = doc_scores(q, local_keys, local_chunk_doc, n_local, backend=backend, keys_scale=keys_scale,
                       doc_score=doc_score).float()                              # [L, n_local]
    L = local.shape[0]
    both = torch.cat([local, local.mean(0, keepdim=True)], 0)                   # [L + 1, n_local]
    all_s, all_i = _gather_candidates(*_local_candidates(both, local_doc_global_ids, k, allow), group)
    layer_s, layer_i = _merge(all_s[:L], all_i[:L], k)      # trimmed separately: k' and k'' may differ
    mean_s, mean_i = _merge(all_s[L:], all_i[L:], k)
    return layer_s, layer_i, mean_s[0], mean_i[0]


def fetch_content(global_ids: Sequence[int] | torch.Tensor, local_doc_global_ids: torch.Tensor,
                  local_content: Sequence[Any] | Mapping[int, Any], group=None) -> list:
    """Content of the selected documents, in the order of global_ids, on every rank.

    global_ids: ids chosen by `sharded_route*` (identical on all ranks; -1 or unknown ids give None);
    local_content: row i holds the content of local document i (a sequence), or a {global id: content}
    mapping. Each rank sends only the rows it owns among global_ids, through all_gather_object (pickled:
    fine for CPU/gloo and modest sizes; tensors come back on the device they were sent from).
    """
    wanted = [int(g) for g in (global_ids.flatten().tolist() if torch.is_tensor(global_ids) else global_ids)]
    gids = [int(g) for g in local_doc_global_ids.tolist()]
    if isinstance(local_content, Mapping):
        owned = {g: local_content[g] for g in set(wanted) if g in local_content}
    else:
        row_of = {g: r for r, g in enumerate(gids)}
        owned = {g: local_content[row_of[g]] for g in set(wanted) if g in row_of}
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, owned, group=group)
    found: dict = {}
    for part in parts:
        found.update(part)
    return [found.get(g) for g in wanted]
