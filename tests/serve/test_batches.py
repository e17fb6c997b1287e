"""glm4voice.serve.batches: a stream handed on in lists, in order, its error last, its reader cancelled."""

from __future__ import annotations

import asyncio

import pytest

from glm4voice.serve.batches import in_batches


async def _source(items, gate: asyncio.Event | None = None, fail: Exception | None = None):
    for item in items:
        yield item
    if gate is not None:
        await gate.wait()
    if fail is not None:
        raise fail


def test_items_that_arrive_while_a_list_is_sent_travel_together():
    async def main():
        gate = asyncio.Event()
        batches = in_batches(_source(range(5), gate))
        first = await anext(batches)  # the reader has run ahead: everything ready so far
        gate.set()
        rest = [b async for b in batches]
        return first, rest

    first, rest = asyncio.run(main())
    assert first == [0, 1, 2, 3, 4] and rest == []


def test_the_error_comes_after_the_items_before_it():
    async def main():
        got = []
        with pytest.raises(RuntimeError, match="broken"):
            async for batch in in_batches(_source([1, 2], fail=RuntimeError("broken"))):
                got.extend(batch)
        return got

    assert asyncio.run(main()) == [1, 2]


def test_closing_early_cancels_the_reader():
    cancelled = asyncio.Event()

    async def endless():
        try:
            yield 1
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        yield 2  # never

    async def main():
        batches = in_batches(endless())
        assert await anext(batches) == [1]
        await batches.aclose()
        await asyncio.wait_for(cancelled.wait(), 30)

    asyncio.run(main())
    assert cancelled.is_set()
