"""Decode the audio blocks of every session on one worker thread, in batches.

Each session's decode task awaits :meth:`BlockBatcher.feed` with its decoder stream and the codes of
its next block. The batcher hands every block waiting at that moment to one
``AudioDecoder.feed_many`` call on the worker; blocks that arrive while a call runs wait for the
next one (group commit: no timer, no polling thread, a lone block is never held back). Blocks of
the same shape run as one batch on the GPU, so 32 listeners cost little more decoder time than one;
each job's result reaches its session as soon as its batch is done.

A decoder without ``feed_many`` (test doubles) gets one ``stream.feed`` call per block instead.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

LATENCY_WEIGHT = 0.3
"""Weight of the newest call in :attr:`BlockBatcher.latency_s`."""


class BlockBatcher:
    """Shared by every session of one event loop (the web demo's); ``max_batch`` None: the decoder's
    largest graphed batch, 1: blocks one at a time (what :meth:`feed` then costs is measured by
    bench/e2e.py)."""

    def __init__(self, decoder: Any, worker: Executor, max_batch: int | None = None):
        self.decoder = decoder
        self.worker = worker
        self.max_batch = max_batch
        self._batched = hasattr(decoder, "feed_many")
        self._waiting: list[tuple[Any, list[int], asyncio.Future]] = []
        self._running = False
        self.latency_s: float | None = None
        """Moving average of a feed_many call's duration (what a block waits for once its call runs)."""
        self.fastest_s: float | None = None
        """The quickest call so far (a small block on an otherwise idle decoder)."""
        self.calls = 0
        """``feed_many`` calls made (with ``jobs`` below: the mean batch a listener shared)."""
        self.jobs = 0

    async def feed(self, stream: Any, codes: Sequence[int]) -> np.ndarray:
        """``stream.feed(codes)``, decoded together with the other sessions' waiting blocks."""
        loop = asyncio.get_running_loop()
        if not self._batched:
            return await loop.run_in_executor(self.worker, stream.feed, list(codes))
        future = loop.create_future()
        self._waiting.append((stream, list(codes), future))
        if not self._running:
            self._start(loop)
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = [job for job in self._waiting if not job[2].done()]  # a cancelled turn's block is dropped
        self._waiting = []
        if not jobs:
            return
        self._running = True
        self.calls += 1
        self.jobs += len(jobs)

        def deliver(index: int, result: Any) -> None:  # on the worker thread, as each batch finishes
            future = jobs[index][2]
            future.get_loop().call_soon_threadsafe(_settle, future, result)

        started = loop.time()
        call = loop.run_in_executor(
            self.worker, lambda: self.decoder.feed_many([(s, c) for s, c, _ in jobs], on_result=deliver, max_batch=self.max_batch)
        )
        call.add_done_callback(lambda done: self._finished(loop, jobs, done, loop.time() - started))

    def _finished(self, loop: asyncio.AbstractEventLoop, jobs, call: asyncio.Future, seconds: float) -> None:
        self._running = False
        self.latency_s = seconds if self.latency_s is None else (1 - LATENCY_WEIGHT) * self.latency_s + LATENCY_WEIGHT * seconds
        self.fastest_s = seconds if self.fastest_s is None else min(self.fastest_s, seconds)
        error = None if call.cancelled() else call.exception()
        if error is not None:  # feed_many itself failed (a bug): every job of the call hears of it
            logger.error("batched block decode failed: %r", error)
        for _, _, future in jobs:  # results were delivered through ``deliver``; anything left failed
            _settle(future, error or RuntimeError("the block was not decoded"))
        if self._waiting:
            self._start(loop)


def _settle(future: asyncio.Future, result: Any) -> None:
    """A job's PCM or exception to its waiting session (unless that turn was cancelled)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
