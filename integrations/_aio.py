"""The one sync -> async bridge of the adapters: iterate a blocking iterable without blocking the event loop.

The engine generates on the calling thread (model forward passes, seconds per answer on a CPU). An async
adapter (`MSALLM.astream_chat`, `ChatMSA._astream`, `MSAQueryEngine.aquery(streaming=True)`) hands each
`next()` to a worker thread, so other tasks keep running while the model works.

One worker thread per iteration, not the shared default pool: a generator must never be resumed from two
threads at once, and when the consumer stops early (`break`, `aclose()`, cancellation) the iterable's
`close()` has to run *after* a `next()` that may still be in flight. A single-worker executor queues
both in order. The caller's context variables (LlamaIndex's instrumentation spans, LangChain's run
managers) are copied into the worker, as `asyncio.to_thread` does.

Imports nothing from the package: both the LlamaIndex and the LangChain adapters use it.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterable, TypeVar

T = TypeVar("T")
_DONE = object()  # next()'s default: marks the end of the iterable (StopIteration cannot cross a Future)

__all__ = ["aiter_in_thread"]


async def aiter_in_thread(make_iterable: Callable[[], Iterable[T]]) -> AsyncIterator[T]:
    """Yield the items of `make_iterable()`, calling it and every `next()` in one worker thread.

    `make_iterable` is called in the worker too, so a call that starts work eagerly (routing, prefill)
    does not block the loop either; pass `lambda: stream` for an iterable that already exists. When the
    consumer stops early, the iterator's `close()` runs (in the worker) so a `Stream` records its result.
    Exceptions from the iterable propagate to the `async for`.
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msa-aiter")

    def call(fn, *args):  # each call runs in the caller's context (one context, used by one thread in turn)
        return loop.run_in_executor(worker, context.run, fn, *args)

    iterator = None
    try:
        iterator = iter(await call(make_iterable))
        while True:
            item = await call(next, iterator, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            # queued behind a next() still running after a cancellation; shielded so a second
            # cancellation does not leave the generator open
            await asyncio.shield(call(close))
        worker.shutdown(wait=False)
