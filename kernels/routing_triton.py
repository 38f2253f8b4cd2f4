"""Fused routing kernel: one pass over the routing keys of all routing layers (MSA.md sections 3 and 7).

Routing is bandwidth bound: per chunk, 64 question tokens x G*D = 1024 dims is 64 flops per bf16 byte,
well inside a tensor core's budget, so the goal is to read every key byte exactly once and write almost
nothing. One program owns BLOCK_C consecutive chunks of one layer (grid = (chunk blocks, layers)):
  1. for each KV head g: load the [BLOCK_C, D] key tile once, tl.dot it with the [BLOCK_T, D] query tile
     (fp32 accumulation; int8 keys get their per-(chunk, head) scale after the dot),
  2. max over the question tokens -> S[c] for the block's chunks,
  3. segmented max over runs of equal document ids inside the block (chunk_doc is sorted, so a document is
     a contiguous run), and one atomic_max per run into out[l, doc] (pre-filled with -inf).
A document spanning several blocks receives one atomic per block; atomic max is order independent, so
results do not depend on scheduling, and repeated launches (autotuning) are harmless.

Under TRITON_INTERPRET=1 (CPU tests) tl.dot on bf16 operands and int8 -> bf16 casts are wrong in triton
3.9's interpreter, so the interpreted kernel upcasts the loaded tiles to fp32 before the dot (DOT_FP32);
the loads and the query rounding are the same as on the GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

NEG_INF = float("-inf")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _segmented_max(doc_a, s_a, doc_b, s_b):
    # Combine for an inclusive scan over (doc, score) pairs sorted by doc: the running max restarts at
    # every new document. Associative because equal documents are contiguous.
    return doc_b, tl.where(doc_a == doc_b, tl.maximum(s_a, s_b), s_b)


# Sizes change with every bank; specialising on them (divisibility by 16, == 1) would recompile every
# autotuning config per bank size. Strides stay specialised: their 16-alignment makes the key loads
# vectorisable, which the software pipeliner needs (cp.async) -- without it no load is prefetched.
# stride_sl (= C*G) only addresses the 4-byte int8 scales.
@triton.jit(do_not_specialize=["T", "C", "n_docs", "c_bucket", "stride_sl"])
def _route_kernel(q_ptr, k_ptr, scale_ptr, q_scale_ptr, doc_ptr, out_ptr,
                  T, C, n_docs, c_bucket,
                  stride_ql, stride_qt, stride_kl, stride_kc, stride_sl, stride_sc,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_C: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
                  SEGMENTED: tl.constexpr, IEEE_DOT: tl.constexpr):
    # c_bucket (log2 of C) is only an autotuning key: small banks are launch bound, large ones bandwidth bound.
    pid_c = tl.program_id(0)
    l = tl.program_id(1).to(tl.int64)                  # int64: l * stride_kl exceeds 2^31 at 100M tokens
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)          # [BLOCK_C]
    mask_c = offs_c < C
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    k_rows = k_ptr + l * stride_kl + offs_c[:, None] * stride_kc + offs_d[None, :]   # [BLOCK_C, BLOCK_D]
    k_mask = mask_c[:, None] & mask_d[None, :]

    best = tl.full([BLOCK_C], float("-inf"), tl.float32)     # S[c] = max over question tokens
    for t0 in range(0, T, BLOCK_T):                    # one pass when T <= BLOCK_T (the usual case)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        q_rows = q_ptr + l * stride_ql + offs_t[:, None] * stride_qt + offs_d[None, :]  # [BLOCK_T, BLOCK_D]
        q_mask = mask_t[:, None] & mask_d[None, :]
        acc = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
        for g in range(G):                             # KV heads: D-wide slices of the folded G*D axis
            kg = tl.load(k_rows + g * D, mask=k_mask, other=0)
            qg = tl.load(q_rows + g * D, mask=q_mask, other=0)
            if DOT_FP32:
                kg = kg.to(tl.float32)
                qg = qg.to(tl.float32)
            elif HAS_SCALE:
                kg = kg.to(tl.float16)                 # int8 values are exact in fp16; q is fp16 too
            if HAS_SCALE:
                sg = tl.load(scale_ptr + l * stride_sl + offs_c * stride_sc + g, mask=mask_c, other=0.0)
                acc += tl.dot(kg, tl.trans(qg)) * sg[:, None]
            elif IEEE_DOT:
                acc = tl.dot(kg, tl.trans(qg), acc, input_precision="ieee")
            else:
                acc = tl.dot(kg, tl.trans(qg), acc)
        acc = tl.where(mask_t[None, :], acc, float("-inf"))  # padded tokens must not win the max
        best = tl.maximum(best, tl.max(acc, axis=1))
    best = best * tl.load(q_scale_ptr + l)             # undo the query normalisation (see _prepare_queries)

    doc = tl.load(doc_ptr + offs_c, mask=mask_c, other=-1)                  # [BLOCK_C], -1 past the end
    dst = out_ptr + l * n_docs + doc
    if SEGMENTED:
        _, run_max = tl.associative_scan((doc, best), 0, _segmented_max)
        nxt = tl.load(doc_ptr + offs_c + 1, mask=(offs_c + 1) < C, other=-1)
        last_of_run = (doc != nxt) | (tl.arange(0, BLOCK_C) == BLOCK_C - 1)  # block end closes a run too
        tl.atomic_max(dst, run_max, mask=mask_c & last_of_run, sem="relaxed")
    else:
        tl.atomic_max(dst, best, mask=mask_c, sem="relaxed")


def _configs():
    # (BLOCK_C, warps, stages): shared memory per program is about stages x (BLOCK_C + BLOCK_T) x D x 2 B,
    # so large tiles run one program per SM and small ones several; autotuning picks per bank size.
    return [triton.Config({"BLOCK_C": bc}, num_warps=w, num_stages=st)
            for bc, w, st in [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 2), (128, 8, 3),
                              (256, 8, 2)]]


_route_kernel_tuned = triton.autotune(
    configs=_configs(), key=["c_bucket", "T", "G", "D", "HAS_SCALE", "IEEE_DOT"])(_route_kernel)


def _dot_dtype(keys: torch.Tensor) -> torch.dtype:
    if keys.dtype == torch.int8:
        return torch.float16
    if keys.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return keys.dtype
    raise TypeError(f"routing keys of dtype {keys.dtype} are not supported")


def _prepare_queries(q: torch.Tensor, keys: torch.Tensor):
    """Queries in the keys' dot dtype, scaled per layer to max |q| = 1 (half precision keeps its range).

    Returns (q_dot [L, T, G*D] contiguous, q_scale [L] float32). fp32 keys use q unchanged (scale 1).
    """
    dt = _dot_dtype(keys)
    q = q.to(device=keys.device, dtype=torch.float32)
    if dt == torch.float32:
        return q.contiguous(), torch.ones(q.shape[0], dtype=torch.float32, device=q.device)
    q_scale = q.abs().amax(dim=(1, 2)).clamp_min(1e-30)                    # [L]
    return (q / q_scale[:, None, None]).to(dt).contiguous(), q_scale.contiguous()


def doc_scores_triton(q: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int,
                      keys_scale: Optional[torch.Tensor] = None, n_kv_heads: Optional[int] = None,
                      block_c: Optional[int] = None, segmented: bool = True) -> torch.Tensor:
    """Routing scores [L, n_docs] float32 by the fused kernel (same contract as `doc_scores_torch`).

    The kernel loops over G slices of width D of the folded G*D axis. int8 keys need the true KV-head split
    (taken from keys_scale: one scale per head); for float keys any split gives the same sums, so G
    defaults to n_kv_heads or to D = 128-wide slices. block_c fixes BLOCK_C (tests); otherwise it is
    autotuned on CUDA and 32 in the interpreter. fp32 keys use an IEEE fp32 dot (exact, not tf32).
    """
    L, C, GD = keys.shape
    T = q.shape[1]
    out = torch.full((L, n_docs), NEG_INF, dtype=torch.float32, device=keys.device)
    if C == 0 or T == 0 or L == 0:
        return out
    has_scale = keys_scale is not None
    if has_scale:
        G = keys_scale.shape[-1]
        keys_scale = keys_scale.to(torch.float32).contiguous()
    elif n_kv_heads is not None:
        G = n_kv_heads
    else:  # float keys: the split only sets the dot's K-tile width
        G = max(1, GD // 128) if GD % 128 == 0 else 1
    D = GD // G
    if G * D != GD:
        raise ValueError(f"G*D = {GD} is not divisible by {G} heads")
    keys = keys.contiguous()
    q_dot, q_scale = _prepare_queries(q, keys)
    chunk_doc = chunk_doc.to(device=keys.device, dtype=torch.int64).contiguous()
    scale_arg = keys_scale if has_scale else q_scale                       # dummy pointer when unused
    stride_sl, stride_sc = (keys_scale.stride(0), keys_scale.stride(1)) if has_scale else (0, 0)
    interp = _interpreting()
    block_t = min(64, max(16, triton.next_power_of_2(T)))
    args = (q_dot, keys, scale_arg, q_scale, chunk_doc, out,
            T, C, n_docs, int(C).bit_length(),
            q_dot.stride(0), q_dot.stride(1), keys.stride(0), keys.stride(1), stride_sl, stride_sc)
    meta = dict(G=G, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=block_t,
                HAS_SCALE=has_scale, DOT_FP32=interp, SEGMENTED=segmented,
                IEEE_DOT=keys.dtype == torch.float32)
    if block_c is None and not interp and keys.is_cuda:
        grid = lambda m: (triton.cdiv(C, m["BLOCK_C"]), L)
        _route_kernel_tuned[grid](*args, **meta)
    else:
        bc = block_c or 32
        _route_kernel[(triton.cdiv(C, bc), L)](*args, BLOCK_C=bc, **meta)
    return out
