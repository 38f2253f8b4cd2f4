"""The sync -> async bridge the adapters share (no model: plain generators)."""

import asyncio
import contextvars
import threading

import pytest

from msa_plugins.integrations._aio import aiter_in_thread

REQUEST = contextvars.ContextVar("request", default=None)


def test_items_in_order_off_the_loop_thread_with_the_callers_context():
    threads, seen = set(), []

    def numbers():
        for i in range(3):
            threads.add(threading.get_ident())
            seen.append(REQUEST.get())
            yield i

    async def run():
        REQUEST.set("r1")
        return [x async for x in aiter_in_thread(numbers)], threading.get_ident()

    items, loop_thread = asyncio.run(run())
    assert items == [0, 1, 2]
    assert loop_thread not in threads and len(threads) == 1  # one worker per iteration
    assert seen == ["r1"] * 3


def test_early_stop_closes_the_iterator_and_errors_propagate():
    closed = threading.Event()

    def pieces():
        try:
            yield from "abcdef"
        finally:
            closed.set()

    async def take_two():
        out = []
        agen = aiter_in_thread(pieces)
        async for p in agen:
            out.append(p)
            if len(out) == 2:
                break
        await agen.aclose()
        return out

    assert asyncio.run(take_two()) == ["a", "b"] and closed.is_set()

    def failing():
        yield 1
        raise KeyError("boom")

    async def drain():
        return [x async for x in aiter_in_thread(failing)]

    with pytest.raises(KeyError, match="boom"):
        asyncio.run(drain())


def test_the_loop_keeps_running_while_an_item_is_produced():
    release = threading.Event()

    def slow():
        release.wait(5)  # blocks its worker thread until the loop has shown it is still running
        yield "done"

    async def run():
        async def unblock():
            await asyncio.sleep(0)
            release.set()
        task = asyncio.create_task(unblock())
        items = [x async for x in aiter_in_thread(slow)]
        await task
        return items

    assert asyncio.run(run()) == ["done"]
