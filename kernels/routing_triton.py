"""Fused routing kernel: one pass over the routing keys of all routing layers (the MSA paper, sections 3 and 7).

Routing is bandwidth bound: per chunk, 64 question tokens x G*D = 1024 dims is 64 flops per bf16 byte,
well inside a tensor core's budget, so the goal is to read every key byte exactly once and write almost
nothing. One program owns BLOCK_C consecutive chunks of one layer (grid = (chunk blocks, layers)):
  1. for each KV head g: load the [BLOCK_C, D] key tile once, tl.dot it with the [BLOCK_T, D] query tile
     (fp32 accumulation). int8 keys meet int8 queries (one scale per token, quantised in one small launch):
     an int8 x int8 -> int32 tensor-core dot straight from shared memory (Hopper wgmma s8 / Ampere
     mma s8), then the key's per-(chunk, head) scale on the partial sum and the token scale once per tile.
     (The earlier int8 -> fp16 cast in registers read the int8 tile from shared memory 2 bytes at a time
     and ran ~1.7x slower than the bf16 keys of twice the size.)
  2. max over the question tokens -> S[c] for the block's chunks,
  3. segmented max over runs of equal document ids inside the block (chunk_doc is sorted, so a document is
     a contiguous run), and one atomic_max per run into out[l, doc] (pre-filled with -inf).
A document spanning several blocks receives one atomic per block; atomic max is order independent, so
results do not depend on scheduling, and repeated launches (tuning) are harmless.

Under TRITON_INTERPRET=1 (CPU tests) tl.dot on bf16 operands and int8 -> bf16 casts are wrong in triton
3.9's interpreter, so the interpreted kernel upcasts the loaded tiles to fp32 before the dot (DOT_FP32);
the loads and the query rounding are the same as on the GPU.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Dict, Optional, Tuple

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
                  SEGMENTED: tl.constexpr, IEEE_DOT: tl.constexpr, HAS_QSCALE: tl.constexpr):
    # c_bucket (log2 of C) is only a tuning key (unused here): small banks are launch bound, large ones bandwidth bound.
    pid_c = tl.program_id(0)
    l = tl.program_id(1).to(tl.int64)                  # int64: l * stride_kl exceeds 2^31 at 100M tokens
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)          # [BLOCK_C]
    mask_c = offs_c < C
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    k_rows = k_ptr + l * stride_kl + offs_c[:, None] * stride_kc + offs_d[None, :]   # [BLOCK_C, BLOCK_D]
    k_mask = mask_c[:, None] & mask_d[None, :]

    s_rows = scale_ptr + l * stride_sl + offs_c * stride_sc      # int8 keys: [BLOCK_C] scales of head g at + g
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)     # S[c] = max over question tokens
    for t0 in range(0, T, BLOCK_T):                    # one pass when T <= BLOCK_T (the usual case)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        q_rows = q_ptr + l * stride_ql + offs_t[:, None] * stride_qt + offs_d[None, :]  # [BLOCK_T, BLOCK_D]
        q_mask = mask_t[:, None] & mask_d[None, :]
        acc = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
        if HAS_SCALE:   # scales are prefetched one head ahead: their load latency hides behind a head's dot
            s_next = tl.load(s_rows, mask=mask_c, other=0.0)
        for g in range(G):                             # KV heads: D-wide slices of the folded G*D axis
            kg = tl.load(k_rows + g * D, mask=k_mask, other=0)
            qg = tl.load(q_rows + g * D, mask=q_mask, other=0)
            if DOT_FP32:
                kg = kg.to(tl.float32)
                qg = qg.to(tl.float32)
            if HAS_SCALE:
                # int8 keys x int8 queries: the integer dot is exact (|sum| <= D * 127^2 < 2^24, so also in
                # the interpreter's fp32 dot); the key's per-(chunk, head) scale multiplies its partial sum.
                sg = s_next
                s_next = tl.load(s_rows + (g + 1) % G, mask=mask_c, other=0.0)   # wraps to head 0: a cache hit
                if DOT_FP32:
                    part = tl.dot(kg, tl.trans(qg), input_precision="ieee")
                else:
                    part = tl.dot(kg, tl.trans(qg), out_dtype=tl.int32).to(tl.float32)
                acc += part * sg[:, None]
            elif IEEE_DOT:
                acc = tl.dot(kg, tl.trans(qg), acc, input_precision="ieee")
            else:
                acc = tl.dot(kg, tl.trans(qg), acc)
        if HAS_SCALE:                                  # per-token query scale (see quantize_queries_int8)
            acc = acc * tl.load(q_scale_ptr + l * T + offs_t, mask=mask_t, other=0.0)[None, :]
        acc = tl.where(mask_t[None, :], acc, float("-inf"))  # padded tokens must not win the max
        best = tl.maximum(best, tl.max(acc, axis=1))
    if HAS_QSCALE:
        best = best * tl.load(q_scale_ptr + l)         # undo the query normalisation (see _prepare_queries)

    doc = tl.load(doc_ptr + offs_c, mask=mask_c, other=-1)                  # [BLOCK_C], -1 past the end
    dst = out_ptr + l * n_docs + doc
    if SEGMENTED:
        _, run_max = tl.associative_scan((doc, best), 0, _segmented_max)
        nxt = tl.load(doc_ptr + offs_c + 1, mask=(offs_c + 1) < C, other=-1)
        last_of_run = (doc != nxt) | (tl.arange(0, BLOCK_C) == BLOCK_C - 1)  # block end closes a run too
        tl.atomic_max(dst, run_max, mask=mask_c & last_of_run, sem="relaxed")
    else:
        tl.atomic_max(dst, best, mask=mask_c, sem="relaxed")


# Launch configs (BLOCK_C, num_warps, num_stages): shared memory per program is about
# stages x (BLOCK_C + BLOCK_T) x D x 2 B, so large tiles run one program per SM and small ones several.
CONFIGS_FULL = ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 2), (128, 8, 3), (256, 8, 2))
CONFIGS_FAST = ((64, 4, 3), (128, 8, 2), (128, 8, 3), (256, 8, 2))
# int8 tiles are half the bytes, so deeper pipelines fit the same shared memory and hide more latency.
CONFIGS_INT8_EXTRA = ((128, 8, 4), (256, 8, 3))
TUNE_ENV = "MSA_ROUTING_TUNE"


def tuning_configs(int8: bool = False):
    """The configs the tuner times, from $MSA_ROUTING_TUNE: "full" (default, 7), "fast" (4: bounds the
    first call's compile + timing cost), or an explicit "128x8x2,64x4x3" (BLOCK_C x warps x stages; a
    single entry means no tuning at all). int8 keys add CONFIGS_INT8_EXTRA to "full" and "fast"."""
    spec = os.environ.get(TUNE_ENV, "full")
    configs = _parse_configs(spec)
    if int8 and spec.strip().lower() in ("", "full", "fast"):
        configs = configs + tuple(c for c in CONFIGS_INT8_EXTRA if c not in configs)
    return configs


@functools.lru_cache(maxsize=32)
def _parse_configs(spec: str):
    spec = spec.strip().lower()
    if spec in ("", "full"):
        return CONFIGS_FULL
    if spec == "fast":
        return CONFIGS_FAST
    try:
        configs = tuple(tuple(int(x) for x in item.split("x")) for item in spec.split(",") if item.strip())
    except ValueError:
        configs = ()
    if not configs or any(len(c) != 3 for c in configs):
        raise ValueError(f"{TUNE_ENV}={spec!r}: expected full, fast or BLOCKxWARPSxSTAGES[,...]")
    return configs


# Tuned config per (device, bank-size bucket, T, head split, dtypes, config set). Small banks are launch
# bound and large ones bandwidth bound, so the bucket is log2 of the chunk count (as the autotuner key was).
_TUNED: Dict[tuple, Tuple[int, int, int]] = {}
# Per-shape launch metadata (everything but the bank size and pointers), so a call does no re-derivation.
_PLANS: Dict[tuple, tuple] = {}
_last_config: Optional[Tuple[int, int, int]] = None


def last_config() -> Optional[Tuple[int, int, int]]:
    """(BLOCK_C, num_warps, num_stages) of the most recent tuned CUDA launch (benchmarks record it)."""
    return _last_config


def _dot_dtype(keys: torch.Tensor) -> torch.dtype:
    if keys.dtype == torch.int8:
        return torch.int8
    if keys.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return keys.dtype
    raise TypeError(f"routing keys of dtype {keys.dtype} are not supported")


@triton.jit
def _quantize_queries_kernel(q_ptr, q8_ptr, s_ptr, GD, BLOCK: tl.constexpr):
    # One program per (layer, token) row: scale = max |q| / 127, q8 = floor(q / scale + 0.5) in [-127, 127].
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < GD
    x = tl.load(q_ptr + row * GD + offs, mask=m, other=0.0)
    s = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-30), 127.0)   # IEEE divisions: same bits as torch
    y = tl.floor(tl.div_rn(x, s) + 0.5)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    tl.store(q8_ptr + row * GD + offs, y.to(tl.int8), mask=m)
    tl.store(s_ptr + row, s)


def _quantize_queries(q: torch.Tensor):
    """`routing.quantize_queries_int8` in one launch: (q8 [L, T, G*D] int8, scale [L, T] float32)."""
    L, T, GD = q.shape
    q8 = torch.empty(q.shape, dtype=torch.int8, device=q.device)
    scale = torch.empty((L, T), dtype=torch.float32, device=q.device)
    _quantize_queries_kernel[(L * T,)](q, q8, scale, GD, BLOCK=triton.next_power_of_2(GD), num_warps=4)
    return q8, scale


def _prepare_queries(q: torch.Tensor, keys: torch.Tensor, dt: torch.dtype):
    """Queries in the keys' dot dtype, scaled per layer to max |q| = 1 (half precision keeps its range).

    Returns (q_dot [L, T, G*D] contiguous, q_scale [L] float32 or None for fp32 keys, which use q as is).
    int8 keys take int8 queries with one scale per (layer, token) instead (q_scale [L, T], one launch).
    Three small kernels (max |q|, clamp, divide-and-round into q_dot); the values are those of the PyTorch
    path's `(q / q.abs().amax()).to(dt)`, so both backends round the queries identically.
    """
    q = q.to(device=keys.device, dtype=torch.float32)
    if dt == torch.float32:
        return q.contiguous(), None
    if dt == torch.int8:
        return _quantize_queries(q.contiguous())
    q_scale = torch.linalg.vector_norm(q, ord=math.inf, dim=(1, 2)).clamp_min_(1e-30)   # [L] max |q|
    q_dot = torch.empty(q.shape, dtype=dt, device=q.device)
    torch.div(q, q_scale.view(-1, 1, 1), out=q_dot)
    return q_dot, q_scale


def _plan(keys: torch.Tensor, keys_scale: Optional[torch.Tensor], n_kv_heads: Optional[int], T: int,
          segmented: bool, interp: bool):
    """(G, D, dot dtype, constexpr meta) for this shape and dtype, cached."""
    GD = keys.shape[2]
    has_scale = keys_scale is not None
    key = (GD, T, keys.dtype, keys_scale.shape[-1] if has_scale else None, n_kv_heads, segmented, interp)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    if has_scale:
        G = keys_scale.shape[-1]
    elif n_kv_heads is not None:
        G = n_kv_heads
    else:  # float keys: the split only sets the dot's K-tile width
        G = max(1, GD // 128) if GD % 128 == 0 else 1
    D = GD // G
    if G * D != GD:
        raise ValueError(f"G*D = {GD} is not divisible by {G} heads")
    dt = _dot_dtype(keys)
    meta = dict(G=G, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_T=min(64, max(16, triton.next_power_of_2(T))),
                HAS_SCALE=has_scale, DOT_FP32=interp, SEGMENTED=segmented,
                IEEE_DOT=keys.dtype == torch.float32, HAS_QSCALE=dt in (torch.bfloat16, torch.float16))
    if len(_PLANS) > 256:
        _PLANS.clear()
    plan = _PLANS[key] = (G, D, dt, meta)
    return plan


def _launch(args, meta, C: int, L: int, cfg):
    bc, warps, stages = cfg
    _route_kernel[(triton.cdiv(C, bc), L)](*args, BLOCK_C=bc, num_warps=warps, num_stages=stages, **meta)


def _time_config(args, meta, C: int, L: int, cfg) -> float:
    """Mean ms per launch: one compile/warm-up launch, one timed launch, then a batch of ~2 ms."""
    _launch(args, meta, C, L, cfg)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    _launch(args, meta, C, L, cfg)
    end.record()
    end.synchronize()
    n = max(3, min(50, int(2.0 / max(start.elapsed_time(end), 1e-3))))
    start.record()
    for _ in range(n):
        _launch(args, meta, C, L, cfg)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def _tuned_config(tune_key: tuple, configs, args, meta, C: int, L: int):
    """The fastest config for tune_key, timing each once per process (launches only max into `out`, so
    the timing launches leave the result unchanged). Inside a CUDA graph capture nothing can be timed:
    an untuned key then uses the first config (warm the shape up before capturing)."""
    cfg = _TUNED.get(tune_key)
    if cfg is not None:
        return cfg
    if len(configs) == 1 or torch.cuda.is_current_stream_capturing():
        return configs[0]
    timings, errors = {}, []
    for c in configs:
        try:
            timings[c] = _time_config(args, meta, C, L, c)
        except Exception as e:  # out of shared memory / registers on this GPU: skip the config
            errors.append(f"{c}: {type(e).__name__}: {e}")
    if not timings:
        raise RuntimeError("no routing kernel config could run:\n" + "\n".join(errors))
    cfg = _TUNED[tune_key] = min(timings, key=timings.get)
    return cfg


def doc_scores_triton(q: torch.Tensor, keys: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int,
                      keys_scale: Optional[torch.Tensor] = None, n_kv_heads: Optional[int] = None,
                      block_c: Optional[int] = None, segmented: bool = True) -> torch.Tensor:
    """Routing scores [L, n_docs] float32 by the fused kernel (same contract as `doc_scores_torch`).

    The kernel loops over G slices of width D of the folded G*D axis. int8 keys need the true KV-head split
    (taken from keys_scale: one scale per head); for float keys any split gives the same sums, so G
    defaults to n_kv_heads or to D = 128-wide slices. block_c fixes BLOCK_C (tests); otherwise the launch
    config is tuned once per shape bucket on CUDA (see `tuning_configs`) and BLOCK_C is 32 in the
    interpreter. fp32 keys use an IEEE fp32 dot (exact, not tf32).

    Per call on CUDA: one fill of the output, three small query kernels (one int8 quantiser for int8 keys,
    none for fp32 keys) and the routing kernel; inputs that are already contiguous and of the right dtype/device are not copied, and
    nothing synchronises with the host (so the call can be captured in a CUDA graph once tuned).
    """
    global _last_config
    L, C, GD = keys.shape
    T = q.shape[1]
    out = torch.full((L, n_docs), NEG_INF, dtype=torch.float32, device=keys.device)
    if C == 0 or T == 0 or L == 0:
        return out
    interp = _interpreting()
    G, D, dt, meta = _plan(keys, keys_scale, n_kv_heads, T, segmented, interp)
    has_scale = keys_scale is not None
    if has_scale:
        keys_scale = keys_scale.to(dtype=torch.float32).contiguous()
    keys = keys.contiguous()
    q_dot, q_scale = _prepare_queries(q, keys, dt)
    chunk_doc = chunk_doc.to(device=keys.device, dtype=torch.int64).contiguous()
    # Unused pointers (no int8 scales / fp32 keys without a query scale) point at `out`: never read.
    scale_arg = keys_scale if has_scale else out
    q_scale_arg = q_scale if q_scale is not None else out
    stride_sl, stride_sc = (keys_scale.stride(0), keys_scale.stride(1)) if has_scale else (0, 0)
    c_bucket = int(C).bit_length()
    args = (q_dot, keys, scale_arg, q_scale_arg, chunk_doc, out,
            T, C, n_docs, c_bucket,
            q_dot.stride(0), q_dot.stride(1), keys.stride(0), keys.stride(1), stride_sl, stride_sc)
    if block_c is None and not interp and keys.is_cuda:
        configs = tuning_configs(int8=has_scale)
        tune_key = (keys.device.index, c_bucket, T, G, D, keys.dtype, has_scale, configs)
        cfg = _tuned_config(tune_key, configs, args, meta, C, L)
        _last_config = cfg
        _launch(args, meta, C, L, cfg)
    else:
        bc = block_c or 32
        _route_kernel[(triton.cdiv(C, bc), L)](*args, BLOCK_C=bc, **meta)
    return out
