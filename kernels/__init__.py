"""Routing kernels for Memory Sparse Attention (EverMind): document scores and top-k (the MSA paper, section 3).

`doc_scores` dispatches to the fused Triton kernel on CUDA and to vectorised PyTorch elsewhere; the
`naive` module is the loop reference every backend is tested against.
"""


def _pypi_kernels_spec():
    """The PyPI package `kernels`' import spec when this folder is imported as a top-level `kernels`, else None.

    This folder is `msa_plugins.kernels` (pyproject.toml maps it). Imported as a top-level `kernels`, a checkout's
    root is on sys.path (`python -m ...` or `python -m pytest` run from it), and the folder stands where the PyPI
    package `kernels` is looked for: transformers >= 5.25 depends on it and imports it. When that package is
    installed, it is loaded in this module's place (the import system returns what sys.modules holds)."""
    import importlib.machinery
    import os
    import sys

    if __name__ != "kernels":
        return None
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    return spec if spec is not None and spec.loader is not None else None


_spec = _pypi_kernels_spec()
if _spec is not None:
    import importlib.util as _util
    import sys as _sys

    _real = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _real
    _spec.loader.exec_module(_real)
else:
    from .naive import doc_scores_naive, doc_scores_naive_late, topk_naive
    from .routing import (DOC_SCORES, RoutingGraph, doc_scores, doc_scores_torch, doc_scores_torch_late,
                          fold_queries, quantize_keys_int8, quantize_queries_int8, route_topk, topk_docs,
                          topk_docs_device, triton_available)

    __all__ = ["DOC_SCORES", "RoutingGraph", "doc_scores", "doc_scores_torch", "doc_scores_torch_late",
               "doc_scores_naive", "doc_scores_naive_late", "fold_queries",
               "quantize_keys_int8", "quantize_queries_int8", "route_topk", "topk_docs", "topk_docs_device",
               "topk_naive", "triton_available"]
