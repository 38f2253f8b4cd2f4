"""Batched decoding for an engine: `with batched(engine, max_batch=8): ...` makes every answer and plain
generation of that engine's model (from any thread) join one running batch, so concurrent requests
share each decode step (see engine/batching.py). The server (`msa serve`) runs one per model; other
callers (benchmarks, an app serving its own threads) use this.
"""

from __future__ import annotations

from .core import MSAEngine
from .engine.batching import BatchScheduler
from .errors import InvalidTypeError
from .validation import check_int


def batched(engine: MSAEngine, max_batch: int = 8, prefill_tokens: int = 2048) -> BatchScheduler:
    """A batch scheduler for `engine`'s model (shared by every engine built on that model). Use it as a
    context manager, or `start()` / `stop()` it. Its `live`, `waiting`, `steps` and `batch_rows`
    (rows decoded, summed over steps) describe the batch."""
    if not isinstance(engine, MSAEngine):
        raise InvalidTypeError(f"batched() needs an MSAEngine, got {type(engine).__name__}")
    check_int(max_batch, "max_batch", minimum=1)
    check_int(prefill_tokens, "prefill_tokens", minimum=1)
    return BatchScheduler(engine.model, max_batch=max_batch, prefill_tokens=prefill_tokens)


__all__ = ["batched"]
