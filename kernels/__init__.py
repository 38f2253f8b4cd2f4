"""Routing kernels for Memory Sparse Attention (EverMind): document scores and top-k (the MSA paper, section 3).

`doc_scores` dispatches to the fused Triton kernel on CUDA and to vectorised PyTorch elsewhere; the
`naive` module is the loop reference every backend is tested against.
"""
from .naive import doc_scores_naive, doc_scores_naive_late, topk_naive
from .routing import (DOC_SCORES, RoutingGraph, doc_scores, doc_scores_torch, doc_scores_torch_late, fold_queries,
                      quantize_keys_int8, quantize_queries_int8, route_topk, topk_docs, topk_docs_device, triton_available)

__all__ = ["DOC_SCORES", "RoutingGraph", "doc_scores", "doc_scores_torch", "doc_scores_torch_late", "doc_scores_naive",
           "doc_scores_naive_late", "fold_queries",
           "quantize_keys_int8", "quantize_queries_int8", "route_topk", "topk_docs", "topk_docs_device",
           "topk_naive", "triton_available"]
