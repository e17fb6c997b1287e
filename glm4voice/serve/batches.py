"""Hand an async stream on in lists: everything that arrived while the previous list was being sent.

A replica streams to its caller through Ray, one object per ``yield``. When the caller keeps up, each
list holds one item and nothing waits; when it falls behind, the items that piled up meanwhile travel
as one object instead of many. No timer: a list is sent as soon as it has one item.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def in_batches(source: AsyncIterator[T]) -> AsyncIterator[list[T]]:
    """The items of ``source`` in order, in non-empty lists; its error (if it fails) after the items
    that came before it. Closing this generator early cancels the task that reads ``source``."""
    ready: list[T] = []
    arrived = asyncio.Event()
    ended: list[BaseException | None] = []

    async def pump() -> None:
        try:
            async for item in source:
                ready.append(item)
                arrived.set()
            ended.append(None)
        except Exception as error:  # noqa: BLE001 - raised to the consumer after the items before it
            ended.append(error)
        arrived.set()

    reader = asyncio.create_task(pump())
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            if ready:
                batch = ready[:]
                ready.clear()
                yield batch
            if ended and not ready:
                if ended[0] is not None:
                    raise ended[0]
                return
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
