"""Document routing scores (MSA.md section 3) in vectorised PyTorch, backend dispatch and top-k.

Routing reads every routing key once per question, so it is memory-bandwidth bound (section 7). The
PyTorch path here is the portable baseline: one batched matmul per tile of chunks for all routing layers,
max over question tokens, scatter-max into documents. `routing_triton` fuses the same steps into one
pass over the keys on CUDA; `doc_scores` picks it when it can.

Shapes used throughout:
  q          [L, T, G*D]  head-folded routing queries (see `fold_queries`), float32
  keys       [L, C, G*D]  chunk-pooled routing keys, float32/bfloat16/float16, or int8 with keys_scale
  keys_scale [L, C, G]    per (chunk, KV head) dequantisation scale of int8 keys, float32
  chunk_doc  [C]          int64 document row of each chunk, non-decreasing
  result     [L, n_docs]  float32, -inf for documents that own no chunk
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

NEG_INF = float("-inf")
_HALF = (torch.bfloat16, torch.float16)


def fold_queries(q_R: torch.Tensor, n_kv_heads: int, scoring: str = "cosine") -> torch.Tensor:
    """[L, T, H, D] per-head routing queries -> [L, T, G*D] head-folded queries.

    With per-head unit-normalised keys, the head mean of per-head cosines equals one dot product with
    q_g = sum over the H/G query heads of KV group g of normalise(q_R[h]) / H (GQA: head h reads KV head
    h // (H/G)). "dot" scoring keeps the raw queries, scaled by 1/sqrt(D) as in attention.
    """
    L, T, H, D = q_R.shape
    G = n_kv_heads
    q = q_R.float()
    if scoring == "cosine":
        q = torch.nn.functional.normalize(q, dim=-1)
    elif scoring == "dot":
        q = q / math.sqrt(D)
    else:
        raise ValueError(f"unknown scoring {scoring!r}")
    return (q.view(L, T, G, H // G, D).sum(3) / H).reshape(L, T, G * D)


def quantize_keys_int8(keys: torch.Tensor, n_kv_heads: Optional[int] = None,
                       tile_chunks: int = 65536) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation with one fp32 scale per (layer, chunk, KV head).

    Halves the bytes routing must read compared with bf16. keys: [L, C, G, D] or [L, C, G*D] (then give
    n_kv_heads). Returns (int8 [L, C, G*D], scale [L, C, G]); key ~= int8 * scale. Works tile by tile so
    that a large bank never needs a float32 copy.
    """
    if keys.dim() == 4:
        L, C, G, D = keys.shape
    else:
        if n_kv_heads is None:
            raise ValueError("keys [L, C, G*D] need n_kv_heads")
        L, C, GD = keys.shape
        G, D = n_kv_heads, GD // n_kv_heads
    keys = keys.reshape(L, C, G, D)
    q8 = torch.empty(L, C, G * D, dtype=torch.int8, device=keys.device)
    scale = torch.empty(L, C, G, dtype=torch.float32, device=keys.device)
    for start in range(0, C, tile_chunks):
        k = keys[:, start:start + tile_chunks].float()                       # [L, n, G, D]
        s = k.abs().amax(-1).clamp_min(1e-30) / 127.0                        # [L, n, G]
        q8[:, start:start + tile_chunks] = torch.round(k / s[..., None]).clamp_(-127, 127).to(torch.int8).flatten(2)
        scale[:, start:start + tile_chunks] = s
    return q8, scale


def _tile_scores(q: torch.Tensor, k: torch.Tensor, k_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """q [L, T, G*D] x keys tile [L, n, G*D] -> scores [L, T, n] float32."""
    if k_scale is not None:  # int8: dequantise the tile (the fused kernel applies the scale after the dot)
        L, n, G = k_scale.shape
        k = (k.view(L, n, G, -1).float() * k_scale[..., None]).view(L, n, -1)
    if k.is_cuda and k.dtype in _HALF:
        # Tensor-core matmul on the stored half keys with fp32 output; q is scaled to max |q| = 1 first
        # so fp16 neither overflows nor flushes small query entries.
        q_scale = q.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)   # [L, 1, 1]
        qh = (q / q_scale).to(k.dtype)
        try:
            s = torch.bmm(qh, k.transpose(1, 2), out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without out_dtype: half output, upcast
            s = torch.bmm(qh, k.transpose(1, 2)).float()
        return s * q_scale
    return torch.bmm(q.float(), k.float().transpose(1, 2))


def doc_scores_torch(q: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int,
                     keys_scale: Optional[torch.Tensor] = None, tile_chunks: Optional[int] = None,
                     tile_bytes: int = 1 << 30) -> torch.Tensor:
    """Vectorised routing scores [L, n_docs], tiled over chunks so temporaries stay under ~tile_bytes.

    Per tile: scores = q @ keys^T for all layers at once ([L, T, n]), max over tokens, scatter-max into
    documents. The output starts at -inf and each tile reduces WITH the current value (include_self=True):
    a document whose chunks straddle two tiles must keep the max of both; with -inf as the start value this
    equals scatter_reduce(include_self=False) on the whole bank.
    """
    L, C, GD = keys.shape
    T = q.shape[1]
    out = torch.full((L, n_docs), NEG_INF, dtype=torch.float32, device=keys.device)
    if C == 0 or T == 0:
        return out
    if tile_chunks is None:
        converts = keys_scale is not None or not (keys.is_cuda and keys.dtype in _HALF)
        per_chunk = L * (T * 4 + (GD * 4 if converts else 0))
        tile_chunks = max(1, tile_bytes // per_chunk)
    q = q.to(keys.device)
    chunk_doc = chunk_doc.to(keys.device)
    for start in range(0, C, tile_chunks):
        end = min(C, start + tile_chunks)
        scale = None if keys_scale is None else keys_scale[:, start:end]
        S = _tile_scores(q, keys[:, start:end], scale).amax(dim=1)          # [L, n] max over tokens
        idx = chunk_doc[start:end].unsqueeze(0).expand(L, -1)
        out.scatter_reduce_(1, idx, S, reduce="amax", include_self=True)
    return out


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def doc_scores(q: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int,
               backend: str = "auto", keys_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Routing scores [L, n_docs] (max over a document's chunks of the max over question tokens).

    backend "auto": the fused Triton kernel for CUDA keys when triton imports, PyTorch otherwise;
    "triton" / "torch" force one ("triton" on CPU tensors needs TRITON_INTERPRET=1 set before triton's
    import, which is for tests only).
    """
    if backend == "auto":
        backend = "triton" if keys.is_cuda and triton_available() else "torch"
    if backend == "torch":
        return doc_scores_torch(q, keys, chunk_doc, n_docs, keys_scale=keys_scale)
    if backend == "triton":
        from .routing_triton import doc_scores_triton
        return doc_scores_triton(q, keys, chunk_doc, n_docs, keys_scale=keys_scale)
    raise ValueError(f"unknown backend {backend!r}")


def topk_docs(doc_scores: torch.Tensor, k: int, allow: Optional[torch.Tensor] = None):
    """Top-k documents per row, ordered by higher score then lower document id (deterministic).

    doc_scores: [n_docs] or [L, n_docs]; allow: optional bool [n_docs]. Documents scored -inf (no chunk)
    or not allowed never appear, so fewer than k come back when fewer are valid: k' = min(k, fewest valid
    documents in any row). The valid set is the same in every layer in practice (both causes are
    per-document), so rows lose nothing to that minimum. Returns (values [.., k'] float32, indices [.., k']
    int64). The id tie-break makes results identical across backends and across sharded ranks.
    """
    one_row = doc_scores.dim() == 1
    s = doc_scores.view(1, -1) if one_row else doc_scores
    if allow is not None:
        s = s.masked_fill(~allow.to(device=s.device, dtype=torch.bool).view(1, -1), NEG_INF)
    R = s.shape[0]
    n_valid = int((s > NEG_INF).sum(1).min()) if s.numel() else 0
    k_eff = min(int(k), n_valid)
    if k_eff <= 0:
        empty = torch.empty(R, 0, device=s.device)
        values, indices = empty.float(), empty.long()
    else:
        kth = torch.topk(s, k_eff, dim=1).values[:, -1:]                   # [R, 1] k-th largest score
        above, tied = s > kth, s == kth
        need = k_eff - above.sum(1, keepdim=True)                           # how many ties to admit
        take = above | (tied & (tied.cumsum(1) <= need))                   # ties: lowest ids first
        indices = take.nonzero()[:, 1].view(R, k_eff)                       # ascending ids per row
        values = s.gather(1, indices)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices
        values, indices = values.gather(1, order), indices.gather(1, order)
    if one_row:
        return values[0], indices[0]
    return values, indices
