"""Document routing scores (the MSA paper, section 3) in vectorised PyTorch, backend dispatch and top-k.

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

import functools
import logging
import math
from typing import Optional, Tuple

import torch

NEG_INF = float("-inf")
_HALF = (torch.bfloat16, torch.float16)
_KEYED = (torch.float32, torch.bfloat16, torch.float16)     # exact in float32: the "topk" key


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


def quantize_queries_int8(q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 queries with one fp32 scale per (layer, token), as the fused kernel uses them with int8
    keys (its int8 x int8 tensor-core dot): q [L, T, G*D] -> (int8 [L, T, G*D], scale [L, T]); q ~= q8 * scale.
    Rounds half up (floor(x + 0.5)) like the kernel's quantiser."""
    q = q.float()
    scale = q.abs().amax(-1).clamp_min(1e-30) / 127.0
    q8 = torch.floor(q / scale[..., None] + 0.5).clamp_(-127, 127).to(torch.int8)
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


def doc_scores_torch_late(q: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int,
                          keys_scale: Optional[torch.Tensor] = None, tile_chunks: Optional[int] = None,
                          tile_bytes: int = 1 << 30) -> torch.Tensor:
    """Late-interaction routing scores [L, n_docs]: mean over question tokens of the max over a document's
    chunks (ColBERT's MaxSim with chunks as the document's vectors), tiled over chunks like
    `doc_scores_torch`.

    Per tile: scores [L, T, n] scatter-maxed into per-token document maxima [L, T, n_docs] (a document
    straddling tiles keeps the max of both), then the mean over tokens. The [L, T, n_docs] accumulator is
    T times the max-max output: fine for the banks routing serves per device (1M documents, 64 question
    tokens, 5 layers: 1.3 GB); the fused kernel has no late mode (see `doc_scores`).
    """
    L, C, GD = keys.shape
    T = q.shape[1]
    if C == 0 or T == 0:
        return torch.full((L, n_docs), NEG_INF, dtype=torch.float32, device=keys.device)
    per_tok = torch.full((L, T, n_docs), NEG_INF, dtype=torch.float32, device=keys.device)
    if tile_chunks is None:
        converts = keys_scale is not None or not (keys.is_cuda and keys.dtype in _HALF)
        tile_chunks = max(1, tile_bytes // (L * (T * 4 + (GD * 4 if converts else 0))))
    q = q.to(keys.device)
    chunk_doc = chunk_doc.to(keys.device)
    for start in range(0, C, tile_chunks):
        end = min(C, start + tile_chunks)
        scale = None if keys_scale is None else keys_scale[:, start:end]
        S = _tile_scores(q, keys[:, start:end], scale)                      # [L, T, n]
        idx = chunk_doc[start:end].view(1, 1, -1).expand(L, T, -1)
        per_tok.scatter_reduce_(2, idx, S, reduce="amax", include_self=True)
    # documents without chunks stay -inf in every token, so their mean is -inf too
    return per_tok.mean(dim=1)


DOC_SCORES = ("maxmax", "late")  # how chunk scores become a document's score (MSAConfig.doc_score)
_late_triton_warned = False


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def doc_scores(q: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int,
               backend: str = "auto", keys_scale: Optional[torch.Tensor] = None,
               doc_score: str = "maxmax") -> torch.Tensor:
    """Routing scores [L, n_docs]: doc_score "maxmax" (the paper's: max over a document's chunks of the
    max over question tokens) or "late" (mean over question tokens of the max over the chunks).

    backend "auto": the fused Triton kernel for CUDA keys when triton imports, PyTorch otherwise;
    "triton" / "torch" force one ("triton" on CPU tensors needs TRITON_INTERPRET=1 set before triton's
    import, which is for tests only). "late" always runs the PyTorch path: the fused kernel reduces
    over tokens before documents, which late interaction cannot (logged once when Triton was asked for).
    """
    global _late_triton_warned
    if doc_score == "late":
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"unknown backend {backend!r}")
        if backend == "triton" and not _late_triton_warned:
            _late_triton_warned = True
            logging.getLogger(__name__).info("doc_score='late' has no fused Triton kernel; using PyTorch")
        return doc_scores_torch_late(q, keys, chunk_doc, n_docs, keys_scale=keys_scale)
    if doc_score != "maxmax":
        raise ValueError(f"unknown doc_score {doc_score!r}; use one of {DOC_SCORES}")
    if backend == "auto":
        backend = "triton" if keys.is_cuda and triton_available() else "torch"
    if backend == "torch":
        return doc_scores_torch(q, keys, chunk_doc, n_docs, keys_scale=keys_scale)
    if backend == "triton":
        from .routing_triton import doc_scores_triton
        return doc_scores_triton(q, keys, chunk_doc, n_docs, keys_scale=keys_scale)
    raise ValueError(f"unknown backend {backend!r}")


def _prepare_topk_scores(doc_scores: torch.Tensor, allow: Optional[torch.Tensor]) -> torch.Tensor:
    """[R, n] scores with every invalid document (-inf, NaN, not allowed) set to -inf; no host sync."""
    s = doc_scores.view(1, -1) if doc_scores.dim() == 1 else doc_scores
    if allow is not None:
        ok = allow.to(device=s.device, dtype=torch.bool).view(1, -1)
        if s.is_floating_point():
            ok = ok & (s == s)                                              # NaN is never a valid score
        return s.masked_fill(~ok, NEG_INF)
    if s.is_floating_point():
        # NaN would sort first; +-inf stay as they are (nan_to_num's defaults would clamp them).
        return torch.nan_to_num(s, nan=NEG_INF, posinf=math.inf, neginf=NEG_INF)
    return s


def _order_key(s: torch.Tensor) -> torch.Tensor:
    """int64 key [R, n] whose descending order is (higher score, then lower id); all keys are distinct.

    High 32 bits: the float32 bits mapped to a signed integer of the same order (negative floats have their
    magnitude bits flipped; -0.0 becomes +0.0 first so that the zeros tie); low 32 bits: 2^32 - 1 - id.
    """
    s32 = s.float() + 0.0                                                  # -0.0 + 0.0 = +0.0
    b = s32.view(torch.int32)
    b = torch.where(b < 0, b ^ 0x7FFFFFFF, b).to(torch.int64)
    low = (0xFFFFFFFF - torch.arange(s.shape[1], device=s.device, dtype=torch.int64))
    return b * 4294967296 + low


def topk_docs_device(doc_scores: torch.Tensor, k: int, allow: Optional[torch.Tensor] = None,
                     method: str = "auto"):
    """Sync-free top-k per row: (values [.., k'], indices [.., k'] int64, valid [.., k'] bool), k' = min(k, n_docs).

    Same order as `topk_docs` (higher score, then lower document id), but nothing is read back to the host,
    so it can run ahead of the caller (and inside a CUDA graph). Invalid documents (-inf / NaN scores, not
    in `allow`) are scored -inf and sort after every valid one, so each row's valid entries come first and
    `valid` is False exactly on its tail; the caller drops them after its one device -> host copy
    (`topk_docs` does: it keeps the fewest valid count over rows).

    method "sort": one stable descending sort per row (stable: equal scores keep ascending ids) -- one
    shared-memory kernel for rows up to 4096 documents on CUDA; "topk": torch.topk on a distinct int64
    key (score bits, then inverted id), linear in n_docs; "auto": sort on CUDA and for short rows, topk for
    long rows on the CPU. Both give identical results.
    """
    one_row = doc_scores.dim() == 1
    s = _prepare_topk_scores(doc_scores, allow)
    R, n = s.shape
    k_eff = max(0, min(int(k), n))
    if method == "auto":
        method = "sort" if (s.is_cuda or n <= 4096 or s.dtype not in _KEYED) else "topk"
    if method == "topk" and s.dtype not in _KEYED:
        raise ValueError(f"method 'topk' orders float32 scores, not {s.dtype}")
    if k_eff == 0:
        values = s[:, :0]
        indices = torch.empty(R, 0, dtype=torch.int64, device=s.device)
    elif method == "sort":
        values, indices = torch.sort(s, dim=1, descending=True, stable=True)
        values, indices = values[:, :k_eff], indices[:, :k_eff]
    elif method == "topk":
        indices = torch.topk(_order_key(s), k_eff, dim=1, largest=True, sorted=True).indices
        values = s.gather(1, indices)
    else:
        raise ValueError(f"unknown top-k method {method!r}")
    valid = values > NEG_INF
    if one_row:
        return values[0], indices[0], valid[0]
    return values, indices, valid


def topk_docs(doc_scores: torch.Tensor, k: int, allow: Optional[torch.Tensor] = None, method: str = "auto"):
    """Top-k documents per row, ordered by higher score then lower document id (deterministic).

    doc_scores: [n_docs] or [L, n_docs]; allow: optional bool [n_docs]. Documents scored -inf (no chunk)
    or not allowed never appear, so fewer than k come back when fewer are valid: k' = min(k, fewest valid
    documents in any row). The valid set is the same in every layer in practice (both causes are
    per-document), so rows lose nothing to that minimum. Returns (values [.., k'], indices [.., k'] int64).
    The id tie-break makes results identical across backends and across sharded ranks.

    This is `topk_docs_device` plus one host read (the valid count) to trim the invalid tail; latency
    sensitive callers use `topk_docs_device` and trim after their own single copy to the host.
    """
    values, indices, valid = topk_docs_device(doc_scores, k, allow, method=method)
    k_eff = int(valid.sum(-1).min()) if valid.numel() else 0
    if k_eff < valid.shape[-1]:
        values, indices = values[..., :k_eff], indices[..., :k_eff]
    return values, indices


def _pack_layers_and_mean(scores: torch.Tensor, k: int, allow: Optional[torch.Tensor]) -> torch.Tensor:
    """[2, L + 1, k''] float64 on the scores' device: values and ids of the per-layer top-k (rows < L) and
    of the layer-mean top-k (row L), invalid entries (-inf) last in each row. No host sync."""
    both = torch.cat([scores, scores.mean(0, keepdim=True)], 0)                # [L + 1, N]
    vals, idx, _ = topk_docs_device(both, k, allow)
    packed = torch.empty((2,) + tuple(vals.shape), dtype=torch.float64, device=vals.device)
    packed[0].copy_(vals)
    packed[1].copy_(idx)
    return packed


def _unpack_layers_and_mean(packed: torch.Tensor):
    host_vals, host_idx = packed[0].float(), packed[1].long()
    L = host_vals.shape[0] - 1
    valid = host_vals > NEG_INF                                                  # valid entries come first
    k_layers = int(valid[:L].sum(1).min()) if L else 0
    k_agg = int(valid[L].sum())
    return host_vals[:L, :k_layers], host_idx[:L, :k_layers], host_vals[L, :k_agg], host_idx[L, :k_agg]


def route_topk(scores: torch.Tensor, k: int, allow: Optional[torch.Tensor] = None):
    """Per-layer top-k of scores [L, N] and the top-k of their layer mean, as CPU tensors, in one copy.

    Returns (layer values [L, k'] float32, layer ids [L, k'] int64, mean values [k''], mean ids [k'']):
    exactly `topk_docs(scores, k, allow)` (k' = min(k, fewest valid documents in any layer)) and
    `topk_docs(scores.mean(0), k, allow)`. Everything runs on the scores' device without a host sync;
    values and ids travel in one float64 buffer (exact for float32 scores and ids below 2^53), so the
    selection costs one device -> host copy of [2, L + 1, k] instead of the [L, N] score matrix.
    """
    return _unpack_layers_and_mean(_pack_layers_and_mean(scores, k, allow).cpu())


class RoutingGraph:
    """One routing step (doc_scores, top-k per layer and of the layer mean) captured as a CUDA graph.

    For a serving loop over a fixed bank: the bank (keys, chunk_doc, keys_scale, allow) and the question
    length T are baked in, so rebuild the graph after the bank changes. Each call copies the new folded
    queries [L, T, G*D] into the static input, replays the graph (one launch for the ~10 kernels) and
    returns `route_topk`'s CPU tensors after one device -> host copy; `replay()` alone leaves the packed
    [2, L + 1, k] result in `self.packed` on the device. Construction runs the step twice on a side stream
    first (kernel tuning and compilation, allocator warm-up), then captures.
    """

    def __init__(self, q: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int, k: int,
                 backend: str = "auto", keys_scale: Optional[torch.Tensor] = None,
                 allow: Optional[torch.Tensor] = None, warmup: int = 2):
        if not keys.is_cuda:
            raise ValueError("RoutingGraph needs CUDA keys")
        dev = keys.device
        self.q = q.detach().to(device=dev, dtype=torch.float32).clone()
        chunk_doc = chunk_doc.to(dev)
        allow = None if allow is None else allow.to(device=dev, dtype=torch.bool)

        def step():
            s = doc_scores(self.q, keys, chunk_doc, n_docs, backend=backend, keys_scale=keys_scale)
            return _pack_layers_and_mean(s, k, allow)

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.packed = step()
        self._bank = (keys, chunk_doc, keys_scale, allow)                   # keep the captured inputs alive

    def replay(self, q: Optional[torch.Tensor] = None) -> torch.Tensor:
        if q is not None:
            self.q.copy_(q)
        self.graph.replay()
        return self.packed

    def __call__(self, q: Optional[torch.Tensor] = None):
        return _unpack_layers_and_mean(self.replay(q).cpu())
