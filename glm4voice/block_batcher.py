"""Decode the audio blocks of every session on one worker thread, in batches.

Each session's decode task hands :meth:`BlockBatcher.submit` its decoder stream and the codes of its
next blocks (usually one; more when blocks were held back or the decoder fell behind). The batcher
hands every block waiting at that moment to one decoder job on the worker (group commit: no timer,
no polling thread, a lone block is never held back): the job decodes the first waiting block of
every session in one ``AudioDecoder.feed_many`` call, then the second ones in a second call, and so
on, so a session's blocks are decoded in order and exactly as they were cut (never merged). Blocks
that arrive while a job runs wait for the next one; the blocks of a turn that stops (its futures
cancelled) are dropped, also between the rounds of a running job. Blocks of the same shape run as
one batch on the GPU, so 32 listeners cost little more decoder time than one; each block's result
reaches its session as soon as its batch is done.

A decoder without ``feed_many`` (test doubles) gets one ``stream.feed`` call per block instead.

``make_way`` (the one-process layout's ``InProcessTokenClient.make_way``): a call that decodes a
stream's first block runs inside it, so that the LLM engine of this process starts no new step
meanwhile and a listener's first audio does not share the GPU with generation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

LATENCY_WEIGHT = 0.3
"""Weight of the newest job in :attr:`BlockBatcher.latency_s`."""


@dataclass
class _Entry:
    """One session's blocks waiting for a decoder job, with a future for each block's PCM."""

    stream: Any
    blocks: list[list[int]]
    futures: list[asyncio.Future]
    first: bool = False
    """``blocks[0]`` is the stream's first block (nothing decoded yet when it was queued)."""
    failure: BaseException | None = field(default=None)
    """Set on the worker when one of the blocks failed: the blocks after it are not decoded."""


class BlockBatcher:
    """Shared by every session of one event loop (the web demo's); ``max_batch`` None: the decoder's
    largest graphed batch, 1: blocks one at a time (what :meth:`feed` then costs is measured by
    bench/e2e.py)."""

    def __init__(
        self,
        decoder: Any,
        worker: Executor,
        max_batch: int | None = None,
        *,
        make_way: Callable[[], AbstractContextManager[None]] | None = None,
    ):
        self.decoder = decoder
        self.worker = worker
        self.max_batch = max_batch
        self.make_way = make_way
        self._batched = hasattr(decoder, "feed_many")
        self._waiting: list[_Entry] = []
        self._running = False
        self.latency_s: float | None = None
        """Moving average of a decoder job's duration (what a block waits for once its job runs)."""
        self.fastest_s: float | None = None
        """The quickest job so far (a small block on an otherwise idle decoder)."""
        self.calls = 0
        """``feed_many`` calls made (with ``jobs`` below: the mean batch a listener shared); counted on
        the worker before the call's results are delivered."""
        self.jobs = 0
        """Blocks decoded by those calls."""

    @property
    def idle(self) -> bool:
        """No decoder job is running (its duration is then in ``latency_s`` and ``fastest_s``)."""
        return not self._running

    async def feed(self, stream: Any, codes: Sequence[int]) -> np.ndarray:
        """``stream.feed(codes)``, decoded together with the other sessions' waiting blocks."""
        return await self.submit(stream, [codes])[0]

    def submit(self, stream: Any, blocks: Sequence[Sequence[int]]) -> list[asyncio.Future]:
        """Queue one stream's blocks, to be decoded in order; a future for each block's PCM (or its
        error; a block after a failed one gets that failure). Cancel the futures of a turn that
        stops: a job not yet started then drops its blocks."""
        loop = asyncio.get_running_loop()
        if not self._batched:  # the single worker runs its jobs in order
            return [loop.run_in_executor(self.worker, stream.feed, list(codes)) for codes in blocks]
        first = getattr(stream, "tokens_decoded", None) == 0
        entry = _Entry(stream, [list(codes) for codes in blocks], [loop.create_future() for _ in blocks], first)
        if entry.blocks:
            self._waiting.append(entry)
            if not self._running:
                self._start(loop)
        return entry.futures

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        entries = [e for e in self._waiting if not all(f.done() for f in e.futures)]  # a cancelled turn's dropped
        self._waiting = []
        if not entries:
            return
        started = loop.time()
        try:
            call = loop.run_in_executor(self.worker, self._decode, entries)
        except RuntimeError as error:  # the worker was shut down (the pipeline is closing)
            for entry in entries:
                for future in entry.futures:
                    _settle(future, RuntimeError(f"the audio decoder is shut down: {error}"))
            return
        self._running = True
        call.add_done_callback(lambda done: self._finished(loop, entries, done, loop.time() - started))

    def _decode(self, entries: list[_Entry]) -> None:
        """On the worker: the k-th blocks of the entries in the k-th ``feed_many`` call."""
        for k in range(max(len(e.blocks) for e in entries)):
            # a session whose turn stopped meanwhile (its futures cancelled on the loop) is not decoded on
            members = [e for e in entries if len(e.blocks) > k and e.failure is None and not e.futures[k].done()]
            if not members:
                break

            def deliver(index: int, result: Any, members=members, k=k) -> None:  # as each batch finishes
                entry = members[index]
                if isinstance(result, BaseException):
                    entry.failure = result
                future = entry.futures[k]
                future.get_loop().call_soon_threadsafe(_settle, future, result)

            jobs = [(e.stream, e.blocks[k]) for e in members]
            self.calls += 1  # before any result reaches a session, which may then read the counts
            self.jobs += len(jobs)
            make_way = self.make_way if k == 0 and any(e.first for e in members) else None
            with make_way() if make_way is not None else nullcontext():
                self.decoder.feed_many(jobs, on_result=deliver, max_batch=self.max_batch)

    def _finished(self, loop: asyncio.AbstractEventLoop, entries: list[_Entry], call: asyncio.Future, seconds: float) -> None:  # fmt: skip
        self._running = False
        self.latency_s = (
            seconds if self.latency_s is None else (1 - LATENCY_WEIGHT) * self.latency_s + LATENCY_WEIGHT * seconds
        )
        self.fastest_s = seconds if self.fastest_s is None else min(self.fastest_s, seconds)
        error = None if call.cancelled() else call.exception()
        if error is not None:  # feed_many itself failed (a bug): every block of the job hears of it
            logger.error("batched block decode failed: %r", error)
        for entry in entries:  # results were delivered through ``deliver``; anything left failed
            for future in entry.futures:
                _settle(future, error or entry.failure or RuntimeError("the block was not decoded"))
        if self._waiting:
            self._start(loop)


def _settle(future: asyncio.Future, result: Any) -> None:
    """A block's PCM or exception to its waiting session (unless that turn was cancelled)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
