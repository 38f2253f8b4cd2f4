"""Routing kernels against the loop reference (msa_plugins.kernels.naive).

Triton: the interpreter (TRITON_INTERPRET=1) is decided when triton is imported and a kernel decorated,
so setting the variable inside this module is fragile: any earlier import of triton in the same pytest
process (another test module, torch._inductor, transformers) would already have compiled-mode kernels.
The robust way is a child process that starts with the variable set: on a CPU-only machine
`test_triton_interpreter_in_subprocess` re-runs this file's `triton` tests in a fresh Python with
TRITON_INTERPRET=1, and those tests run in-process only when the process started interpreted or CUDA is
present (then on GPU tensors, compiled, no interpreter: benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from msa_plugins.kernels import (RoutingGraph, doc_scores, doc_scores_naive, doc_scores_torch, fold_queries,
                                 quantize_keys_int8, quantize_queries_int8, route_topk, topk_docs,
                                 topk_docs_device, topk_naive, triton_available)
from msa_plugins.kernels.naive import doc_scores_naive_heads
from msa_plugins.kernels.routing import _pack_layers_and_mean

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = triton_available()
if INTERPRETED and HAS_TRITON:
    TRITON_DEVICE = "cpu"
elif HAS_TRITON and torch.cuda.is_available():
    TRITON_DEVICE = "cuda"
else:
    TRITON_DEVICE = None
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="needs CUDA or a TRITON_INTERPRET=1 process")


def make_bank(chunks_per_doc, L=2, T=3, H=4, G=2, D=16, seed=0):
    """Random bank: per-head routing queries q_R [L, T, H, D], raw pooled keys [L, C, G, D], chunk_doc [C]."""
    gen = torch.Generator().manual_seed(seed)
    chunk_doc = torch.repeat_interleave(torch.arange(len(chunks_per_doc)), torch.tensor(chunks_per_doc))
    C = int(chunk_doc.numel())
    q_R = torch.randn(L, T, H, D, generator=gen)
    keys = torch.randn(L, C, G, D, generator=gen)
    return q_R, keys, chunk_doc, len(chunks_per_doc)


def folded(q_R, keys):
    """Cosine routing inputs as the engine passes them: folded queries, unit-normalised flat keys."""
    G = keys.shape[2]
    return fold_queries(q_R, G), torch.nn.functional.normalize(keys, dim=-1).flatten(2)


def assert_scores_close(actual, expected, atol):
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), "-inf pattern differs"
    finite = torch.isfinite(expected)
    assert torch.allclose(actual[finite], expected[finite], atol=atol, rtol=0), \
        (actual[finite] - expected[finite]).abs().max()


# Documents with no chunk (0), single-chunk documents, long runs that straddle tiles/blocks, a last empty doc.
BANK = [3, 1, 0, 8, 2, 0, 0, 21, 1, 5, 0]


@pytest.mark.parametrize("scoring", ["cosine", "dot"])
def test_fold_queries_equals_head_mean_gqa(scoring):
    q_R, keys, chunk_doc, n_docs = make_bank(BANK, H=6, G=2)      # GQA: 3 query heads per KV head
    expected = doc_scores_naive_heads(q_R, keys, chunk_doc, n_docs, scoring=scoring)
    if scoring == "cosine":
        q, k = folded(q_R, keys)
    else:
        q, k = fold_queries(q_R, 2, scoring="dot"), keys.flatten(2)
    assert_scores_close(doc_scores_naive(q, k, chunk_doc, n_docs), expected, atol=1e-5)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("tile_chunks", [None, 1, 5])
def test_torch_matches_naive(T, tile_chunks):
    q_R, keys, chunk_doc, n_docs = make_bank(BANK, T=T, seed=T)
    q, k = folded(q_R, keys)
    expected = doc_scores_naive(q, k, chunk_doc, n_docs)
    assert torch.isinf(expected[:, [2, 5, 6, 10]]).all() and torch.isfinite(expected[:, [0, 1, 3]]).all()
    got = doc_scores_torch(q, k, chunk_doc, n_docs, tile_chunks=tile_chunks)
    assert_scores_close(got, expected, atol=1e-6)
    assert_scores_close(doc_scores(q, k, chunk_doc, n_docs), expected, atol=1e-6)   # auto on CPU = torch


def test_partial_bank_and_empty():
    """A bank whose chunk runs cover only some document rows (rows past the last chunk stay -inf)."""
    q_R, keys, chunk_doc, _ = make_bank([2, 3])
    q, k = folded(q_R, keys)
    got = doc_scores_torch(q, k, chunk_doc + 1, 6)            # docs 1, 2 own chunks; 0, 3, 4, 5 do not
    assert_scores_close(got, doc_scores_naive(q, k, chunk_doc + 1, 6), atol=1e-6)
    assert torch.isinf(got[:, [0, 3, 4, 5]]).all()
    empty = doc_scores_torch(q, k[:, :0], chunk_doc[:0], 3)
    assert empty.shape == (2, 3) and torch.isinf(empty).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_half_keys(dtype):
    q_R, keys, chunk_doc, n_docs = make_bank(BANK, seed=3)
    q, k = folded(q_R, keys)
    kh = k.to(dtype)
    expected = doc_scores_naive(q, kh, chunk_doc, n_docs)        # same rounded keys, fp64 math
    assert_scores_close(doc_scores_torch(q, kh, chunk_doc, n_docs), expected, atol=1e-5)
    # and the key rounding itself stays small against fp32 keys
    assert_scores_close(expected, doc_scores_naive(q, k, chunk_doc, n_docs), atol=1e-2)


def test_int8_keys_within_tolerance():
    q_R, keys, chunk_doc, n_docs = make_bank(BANK, G=2, D=64, seed=4)
    q, k = folded(q_R, keys)
    k8, scale = quantize_keys_int8(k, n_kv_heads=2)
    assert k8.dtype == torch.int8 and scale.shape == (2, k.shape[1], 2)
    exact = doc_scores_naive(q, k, chunk_doc, n_docs)
    quant = doc_scores_naive(q, k8, chunk_doc, n_docs, keys_scale=scale)
    assert_scores_close(quant, exact, atol=3e-3)
    assert_scores_close(doc_scores_torch(q, k8, chunk_doc, n_docs, keys_scale=scale), quant, atol=1e-6)
    assert_scores_close(doc_scores(q, k8, chunk_doc, n_docs, keys_scale=scale), quant, atol=1e-6)
    with pytest.raises(ValueError):
        quantize_keys_int8(k)                                     # flat keys need the head count


def clustered_bank(n_docs=300, L=2, G=2, D=64, H=4, T=16, n_queries=16, seed=5):
    """Documents = topic vectors + chunk noise; each question's tokens lean towards a few documents, graded
    down to zero so the top-5 boundary has near ties (5-bit keys drop to ~0.96 recall here, int8 ~0.99)."""
    gen = torch.Generator().manual_seed(seed)
    chunks = torch.randint(1, 6, (n_docs,), generator=gen)
    chunk_doc = torch.repeat_interleave(torch.arange(n_docs), chunks)
    topic = torch.randn(L, n_docs, G, D, generator=gen)
    keys = topic[:, chunk_doc] + 0.8 * torch.randn(L, chunk_doc.numel(), G, D, generator=gen)
    queries = []
    for _ in range(n_queries):
        targets = torch.randint(0, n_docs, (T,), generator=gen)
        weight = torch.linspace(0.3, 0.0, T).view(1, T, 1, 1)       # graded relevance: near ties at the tail
        q_R = weight * topic[:, targets].repeat_interleave(H // G, dim=2) + torch.randn(L, T, H, D, generator=gen)
        queries.append(fold_queries(q_R, G))
    return queries, torch.nn.functional.normalize(keys, dim=-1).flatten(2), chunk_doc, n_docs


@pytest.mark.parametrize("int8_queries", [False, True])
def test_int8_keeps_top5_recall(int8_queries):
    """int8 keys (PyTorch path: fp queries) and int8 keys x int8 queries (what the fused kernel computes)."""
    queries, k, chunk_doc, n_docs = clustered_bank()
    k8, scale = quantize_keys_int8(k, n_kv_heads=2)
    hits = total = 0
    for q in queries:
        _, ref = topk_docs(doc_scores_torch(q, k, chunk_doc, n_docs), 5)
        if int8_queries:
            q8, q_scale = quantize_queries_int8(q)
            q = q8.float() * q_scale[..., None]
        _, got = topk_docs(doc_scores_torch(q, k8, chunk_doc, n_docs, keys_scale=scale), 5)
        for a, b in zip(ref.tolist(), got.tolist()):
            hits += len(set(a) & set(b))
            total += 5
    assert hits / total >= 0.98, hits / total


def test_quantize_queries_int8():
    q = torch.randn(2, 5, 48) * torch.logspace(-3, 2, 5).view(1, 5, 1)   # per-token scales of any size
    q[1, 2] = 0.0                                                          # an all-zero token
    q8, s = quantize_queries_int8(q)
    assert q8.dtype == torch.int8 and s.shape == (2, 5) and int(q8.abs().max()) == 127
    assert torch.equal(q8[1, 2], torch.zeros(48, dtype=torch.int8))
    assert ((q8.float() * s[..., None] - q).abs() <= 0.5 * s[..., None] * (1 + 1e-5)).all()


def test_topk_rules():
    s = torch.tensor([[0.5, float("-inf"), 0.9, 0.5, 0.1, 0.5],
                      [0.2, float("-inf"), 0.3, 0.7, 0.7, 0.0]])
    v, i = topk_docs(s, 3)
    assert i.tolist() == [[2, 0, 3], [3, 4, 2]]                   # ties: lower id first, also at the boundary
    assert torch.equal(v, torch.tensor([[0.9, 0.5, 0.5], [0.7, 0.7, 0.3]]))
    v, i = topk_docs(s, 50)                                       # k > valid documents: only valid ones
    assert i.shape == (2, 5) and 1 not in i.tolist()[0]
    allow = torch.tensor([True, True, False, True, False, True])
    v, i = topk_docs(s, 50, allow=allow)
    assert i.tolist() == [[0, 3, 5], [3, 0, 5]]
    v1, i1 = topk_docs(s[0], 2)                                   # 1-D in, 1-D out
    assert i1.tolist() == [2, 0] and v1.shape == (2,)
    v0, i0 = topk_docs(s, 3, allow=torch.zeros(6, dtype=torch.bool))
    assert i0.shape == (2, 0) and i0.dtype == torch.int64
    for k in (1, 3, 9):
        for a in (None, allow):
            ref_v, ref_i = topk_naive(s, k, a)
            got_v, got_i = topk_docs(s, k, a)
            assert torch.equal(got_i, ref_i) and torch.equal(got_v, ref_v)


def test_topk_matches_naive_random():
    gen = torch.Generator().manual_seed(7)
    s = torch.randint(0, 6, (3, 40), generator=gen).float() / 4  # many ties
    s[:, ::7] = float("-inf")
    for k in (1, 5, 12, 40):
        ref_v, ref_i = topk_naive(s, k)
        got_v, got_i = topk_docs(s, k)
        assert torch.equal(got_i, ref_i) and torch.equal(got_v, ref_v)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tied_scores(R, n, gen):
    """Scores with many ties, -inf (no chunk), -0.0 next to +0.0, and NaN."""
    s = torch.randint(-3, 4, (R, n), generator=gen).float() / 2
    s[torch.rand(R, n, generator=gen) < 0.2] = float("-inf")
    s[torch.rand(R, n, generator=gen) < 0.1] = -0.0
    s[torch.rand(R, n, generator=gen) < 0.03] = float("nan")
    return s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["sort", "topk"])
def test_topk_device_matches_naive(device, method):
    """Sync-free top-k: exactly min(k, n) columns, each row's valid entries first and equal to the naive
    top-k of that row; topk_docs (its trimmed form) equals topk_naive. Ties, -inf, NaN, allow, k > n."""
    gen = torch.Generator().manual_seed(11)
    cases = [(int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen)))
             for _ in range(40)] + [(3, 5000)]                      # 5000 > 4096: CUDA's segmented sort
    for trial, (R, n) in enumerate(cases):
        s = tied_scores(R, n, gen)
        allow = None if trial % 2 else torch.rand(n, generator=gen) < 0.7
        dev_allow = None if allow is None else allow.to(device)
        for k in (0, 1, 3, n, n + 5):
            v, i, valid = topk_docs_device(s.to(device), k, dev_allow, method=method)
            assert v.shape == i.shape == valid.shape == (R, min(k, n)) and i.dtype == torch.int64
            assert v.device.type == i.device.type == valid.device.type == device
            v, i, valid = v.cpu(), i.cpu(), valid.cpu()
            for r in range(R):
                ref_v, ref_i = topk_naive(s[r], k, allow)
                nv = int(valid[r].sum())
                assert nv == ref_i.numel() and valid[r, :nv].all()
                assert torch.equal(i[r, :nv], ref_i) and torch.equal(v[r, :nv], ref_v)
                assert torch.isinf(v[r, nv:]).all()
            ref_v, ref_i = topk_naive(s, k, allow)
            got_v, got_i = topk_docs(s.to(device), k, dev_allow, method=method)
            assert torch.equal(got_i.cpu(), ref_i) and torch.equal(got_v.cpu(), ref_v)
            v1, i1, m1 = topk_docs_device(s[0].to(device), k, dev_allow, method=method)    # 1-D in, 1-D out
            assert v1.dim() == i1.dim() == m1.dim() == 1 and torch.equal(i1.cpu(), i[0])


@pytest.mark.parametrize("device", DEVICES)
def test_topk_edge_shapes(device):
    empty = torch.empty(2, 0, device=device)
    v, i, m = topk_docs_device(empty, 3)
    assert v.shape == i.shape == m.shape == (2, 0)
    v, i = topk_docs(empty, 3)
    assert v.shape == i.shape == (2, 0) and i.dtype == torch.int64
    v, i = topk_docs(torch.empty(0, 5, device=device), 3)
    assert v.shape == i.shape == (0, 0)
    with pytest.raises(ValueError):
        topk_docs_device(torch.zeros(2, 3, device=device), 1, method="heap")


@pytest.mark.parametrize("device", DEVICES)
def test_route_topk_equals_topk_docs(device):
    """The engine's one-copy selection = topk_docs per layer and on the layer mean, on CPU tensors."""
    gen = torch.Generator().manual_seed(12)
    for trial in range(30):
        L, n = int(torch.randint(0, 4, (1,), generator=gen)), int(torch.randint(1, 30, (1,), generator=gen))
        s = torch.randint(-2, 3, (L, n), generator=gen).float() / 2
        s[:, torch.rand(n, generator=gen) < 0.2] = float("-inf")          # documents without chunks
        if L:
            s[torch.rand(L, n, generator=gen) < 0.05] = float("-inf")
        allow = None if trial % 2 else torch.rand(n, generator=gen) < 0.7
        for k in (1, 3, 40):
            lv, li, av, ai = route_topk(s.to(device), k, None if allow is None else allow.to(device))
            rv, ri = topk_docs(s, k, allow)
            # the reference ranks the same layer-mean scores (a CUDA mean may differ from a CPU one in the last bit)
            rav, rai = topk_docs(s.to(device).mean(0).cpu(), k, allow)
            for got, ref in ((lv, rv), (li, ri), (av, rav), (ai, rai)):
                assert got.device.type == "cpu" and got.dtype == ref.dtype and torch.equal(got, ref)


def cuda_bank(L=2, G=2, D=64, T=8, n_docs=300, C=900, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    chunk_doc = torch.sort(torch.randint(0, n_docs, (C,), device="cuda", generator=gen)).values
    q = fold_queries(torch.randn(L, T, 2 * G, D, device="cuda", generator=gen), G)
    k = torch.nn.functional.normalize(torch.randn(L, C, G, D, device="cuda", generator=gen), dim=-1)
    return q, k.flatten(2).to(dtype), chunk_doc, n_docs


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_routing_step_has_no_host_sync(backend):
    """doc_scores + topk_docs_device + the packed selection: no host synchronisation once warmed up."""
    q, k, chunk_doc, n_docs = cuda_bank()
    allow = torch.rand(n_docs, device="cuda") < 0.8
    for _ in range(2):                                                 # tune / compile outside the check
        topk_docs_device(doc_scores(q, k, chunk_doc, n_docs, backend=backend), 5, allow)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = doc_scores(q, k, chunk_doc, n_docs, backend=backend)
        topk_docs_device(s, 5, allow, method="sort")
        topk_docs_device(s, 5, allow, method="topk")
        _pack_layers_and_mean(s, 5, allow)                             # what route_topk copies to the host
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("n_docs,C", [(300, 900), (5000, 6000)])
def test_routing_graph_matches_eager(n_docs, C):
    q, k, chunk_doc, _ = cuda_bank(n_docs=n_docs, C=C, seed=1)
    allow = torch.rand(n_docs, device="cuda") < 0.9
    graph = RoutingGraph(q, k, chunk_doc, n_docs, 7, allow=allow)
    for seed in (2, 3):
        q2 = cuda_bank(n_docs=n_docs, C=C, seed=seed)[0]
        expected = route_topk(doc_scores(q2, k, chunk_doc, n_docs), 7, allow)
        got = graph(q2)
        for g, e in zip(got, expected):
            assert torch.equal(g, e)


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
def test_tuning_config_sets(monkeypatch):
    from msa_plugins.kernels.routing_triton import CONFIGS_FAST, CONFIGS_FULL, TUNE_ENV, tuning_configs
    monkeypatch.delenv(TUNE_ENV, raising=False)
    assert tuning_configs() == CONFIGS_FULL
    monkeypatch.setenv(TUNE_ENV, "fast")
    assert tuning_configs() == CONFIGS_FAST and set(CONFIGS_FAST) <= set(CONFIGS_FULL)
    monkeypatch.setenv(TUNE_ENV, "128x8x2, 64x4x3")
    assert tuning_configs() == ((128, 8, 2), (64, 4, 3))
    monkeypatch.setenv(TUNE_ENV, "128x8")
    with pytest.raises(ValueError):
        tuning_configs()


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("tile_chunks", [None, 1, 5])
def test_late_interaction_torch_matches_naive(T, tile_chunks):
    """doc_score="late": mean over tokens of the max over a document's chunks, tiles straddling documents."""
    from msa_plugins.kernels import doc_scores_naive_late, doc_scores_torch_late
    q_R, keys, chunk_doc, n_docs = make_bank(BANK, T=T, seed=10 + T)
    q, k = folded(q_R, keys)
    expected = doc_scores_naive_late(q, k, chunk_doc, n_docs)
    assert torch.isinf(expected[:, [2, 5, 6, 10]]).all() and torch.isfinite(expected[:, [0, 1, 3]]).all()
    assert_scores_close(doc_scores_torch_late(q, k, chunk_doc, n_docs, tile_chunks=tile_chunks), expected, atol=1e-6)
    for backend in ("auto", "torch"):
        assert_scores_close(doc_scores(q, k, chunk_doc, n_docs, backend=backend, doc_score="late"), expected, atol=1e-6)
    if T == 1:  # one token: late interaction and max-max agree
        assert_scores_close(expected, doc_scores_naive(q, k, chunk_doc, n_docs), atol=1e-6)
    else:  # late never exceeds max-max (a mean of maxima is at most their max)
        finite = torch.isfinite(expected)
        assert (expected[finite] <= doc_scores_naive(q, k, chunk_doc, n_docs)[finite] + 1e-6).all()


def test_late_interaction_int8_keys_and_triton_fallback():
    """int8 keys dequantise like max-max; the Triton backend has no late kernel and falls back to PyTorch."""
    from msa_plugins.kernels import doc_scores_naive_late
    q_R, keys, chunk_doc, n_docs = make_bank(BANK, T=3, seed=5)
    q, k = folded(q_R, keys)
    k8, scale = quantize_keys_int8(k, n_kv_heads=2)
    expected = doc_scores_naive_late(q, k8, chunk_doc, n_docs, keys_scale=scale)
    assert_scores_close(doc_scores(q, k8, chunk_doc, n_docs, keys_scale=scale, doc_score="late"), expected, atol=1e-5)
    assert_scores_close(doc_scores(q, k, chunk_doc, n_docs, backend="triton", doc_score="late"),
                        doc_scores_naive_late(q, k, chunk_doc, n_docs), atol=1e-6)
    with pytest.raises(ValueError):
        doc_scores(q, k, chunk_doc, n_docs, doc_score="mean")


def test_unknown_backend():
    q_R, keys, chunk_doc, n_docs = make_bank([1, 2])
    q, k = folded(q_R, keys)
    with pytest.raises(ValueError):
        doc_scores(q, k, chunk_doc, n_docs, backend="cuda-magic")


# ---------------------------------------------------------------- Triton (interpreted on CPU, or CUDA)

TRITON_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("T,block_c,segmented", [(1, 16, True), (5, 16, False), (70, 32, True)])
def test_triton_matches_naive(dtype, T, block_c, segmented):
    """Covers GQA folding, T = 1 and T > 64 (two token tiles), runs straddling blocks, empty documents."""
    from msa_plugins.kernels.routing_triton import doc_scores_triton
    q_R, keys, chunk_doc, n_docs = make_bank(BANK, T=T, H=4, G=2, D=32, seed=T)
    q, k = folded(q_R, keys)
    if dtype == torch.int8:
        k, scale = quantize_keys_int8(k, n_kv_heads=2)
        # The kernel quantises the queries too (int8 tensor-core dot): exact integer dots, then fp32 scales.
        q8, q_scale = quantize_queries_int8(q)
        expected, tol = doc_scores_naive(q8.float() * q_scale[..., None], k, chunk_doc, n_docs, keys_scale=scale), 1e-5
        # and the query rounding stays within the old int8 tolerance against fp queries
        assert_scores_close(expected, doc_scores_naive(q, k, chunk_doc, n_docs, keys_scale=scale), atol=2e-3)
    else:
        k, scale = k.to(dtype), None
        expected, tol = doc_scores_naive(q, k, chunk_doc, n_docs), TRITON_TOL[dtype]
    dev = TRITON_DEVICE
    to = (lambda x: None if x is None else x.to(dev))
    got = doc_scores_triton(to(q), to(k), to(chunk_doc), n_docs, keys_scale=to(scale),
                            block_c=block_c, segmented=segmented)
    assert got.device.type == dev
    assert_scores_close(got.cpu(), expected, atol=tol)
    if dtype == torch.float32:
        assert torch.equal(topk_docs(got.cpu(), 4)[1], topk_naive(expected, 4)[1])
        if T == 1:  # dispatch (autotuned on CUDA: once, to bound compile time)
            assert torch.equal(doc_scores(to(q), to(k), to(chunk_doc), n_docs, backend="triton").cpu().isinf(),
                               expected.isinf())


@needs_triton
def test_triton_matches_naive_query_quantiser():
    """The kernel's one-launch query quantiser gives the bits of `quantize_queries_int8`."""
    from msa_plugins.kernels.routing_triton import _quantize_queries
    q = torch.randn(3, 7, 96) * torch.logspace(-3, 2, 7).view(1, 7, 1)
    q[0, 1] = 0.0
    q8, s = _quantize_queries(q.to(TRITON_DEVICE))
    r8, rs = quantize_queries_int8(q)
    assert torch.equal(s.cpu(), rs) and torch.equal(q8.cpu(), r8)


@needs_triton
@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="large bank: compiled CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_triton_cuda_autotuned_large(dtype):
    """Paper-shaped heads (8 x 128) on a 200K-token bank: autotuned kernel vs the PyTorch path."""
    from msa_plugins.kernels.routing_triton import doc_scores_triton
    gen = torch.Generator(device="cuda").manual_seed(0)
    L, G, D, T, n_docs = 3, 8, 128, 64, 200
    chunk_doc = torch.sort(torch.randint(0, n_docs, (3125,), device="cuda", generator=gen)).values
    q = fold_queries(torch.randn(L, T, 32, D, device="cuda", generator=gen), G)
    k = torch.nn.functional.normalize(torch.randn(L, 3125, G, D, device="cuda", generator=gen), dim=-1)
    k = k.flatten(2)
    if dtype == torch.int8:
        k, scale = quantize_keys_int8(k, n_kv_heads=G)
    else:
        k, scale = k.to(dtype), None
    expected = doc_scores_torch(q.float(), k, chunk_doc, n_docs, keys_scale=scale)
    got = doc_scores_triton(q, k, chunk_doc, n_docs, keys_scale=scale)
    assert_scores_close(got.cpu(), expected.cpu(), atol=5e-3)
    assert doc_scores(q, k, chunk_doc, n_docs, keys_scale=scale).device.type == "cuda"


@pytest.mark.skipif(TRITON_DEVICE is not None or not HAS_TRITON,
                    reason="triton tests already run in this process (or triton missing)")
def test_triton_interpreter_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "triton_matches_naive"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
@pytest.mark.parametrize("key_type,q_type,has_scale,ieee", [("bf16", "bf16", False, False),
                                                              ("i8", "i8", True, False),
                                                              ("fp32", "fp32", False, True)])
def test_triton_kernel_compiles_for_gpus(key_type, q_type, has_scale, ieee):
    """Compile (no GPU needed) for Hopper and Ampere at the paper's head shape, as the autotuner would.

    The interpreter accepts things the compiler rejects (it ran a kernel reading a Python global), and
    the key loads must be prefetched by the software pipeliner (cp.async in the PTX): unaligned strides
    silently turn it off and leave the kernel latency bound.
    """
    import inspect
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton without the NVIDIA backend")
    from msa_plugins.kernels.routing_triton import _route_kernel
    names = list(inspect.signature(_route_kernel.fn).parameters)
    ints = ["T", "C", "n_docs", "c_bucket", "stride_ql", "stride_qt", "stride_kl", "stride_kc", "stride_sl", "stride_sc"]
    sig = {"q_ptr": f"*{q_type}", "k_ptr": f"*{key_type}", "scale_ptr": "*fp32", "q_scale_ptr": "*fp32",
           "doc_ptr": "*i64", "out_ptr": "*fp32", **{n: "i32" for n in ints}}
    constexprs = dict(G=8, D=128, BLOCK_D=128, BLOCK_T=64, BLOCK_C=128, HAS_SCALE=has_scale, DOT_FP32=False,
                      SEGMENTED=True, IEEE_DOT=ieee, HAS_QSCALE=key_type == "bf16")
    sig.update({k: "constexpr" for k in constexprs})
    aligned = ["q_ptr", "k_ptr", "scale_ptr", "q_scale_ptr", "doc_ptr", "out_ptr",
               "stride_ql", "stride_qt", "stride_kl", "stride_kc"]       # what runtime specialisation sees
    src = ASTSource(fn=_route_kernel, signature=sig,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    for arch in (90, 80):
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8, "num_stages": 2})
        ptx = kernel.asm["ptx"]
        assert "cp.async" in ptx, f"sm_{arch}: key loads not pipelined"
        assert "red.global" in ptx or "atom.global" in ptx     # relaxed atomic max: fire-and-forget red
        if arch == 90 and key_type != "fp32":
            assert "wgmma" in ptx, "Hopper: expected warpgroup tensor-core dots"
        if key_type == "i8":
            # int8 x int8 -> int32 tensor-core dots with both operands in shared memory: no int8 -> fp16
            # cast in registers (that read the int8 tile from shared memory 2 bytes at a time).
            assert ("wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8" if arch == 90 else ".s32.s8.s8.s32") in ptx
            assert "ld.shared.v2.b8" not in ptx and "cvt.rn.f16.s" not in ptx
