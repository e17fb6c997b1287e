"""Decode the audio blocks of every session on one worker thread, in batches.

Each session's decode task hands :meth:`BlockBatcher.submit` its decoder stream and the codes of its
next blocks (usually one; more when blocks were held back or the decoder fell behind). A job is one
``AudioDecoder.feed_many`` call on the worker: the next waiting block of every session it takes, so a
session's blocks are decoded in order and exactly as they were cut (never merged); a session's later
blocks wait for the next job. Blocks that arrive while a job runs wait for the next one; the blocks of
a turn that stops (its futures cancelled) are dropped. Blocks of the same shape run as one batch on the
GPU, so 32 listeners cost little more decoder time than one; each block's result reaches its session
as soon as its batch is done.

**First blocks first.** While a stream's first block waits (a listener waits for the answer's first
audio), the next job decodes only first blocks: at most the running call stands between a new turn
and its first audio, never the other sessions' queued blocks.

A decoder without ``feed_many`` (test doubles) gets one ``stream.feed`` call per block instead.

**Blocks a listener needs only later wait to share a call.** A block submitted with ``due`` (the loop
time at which its listener would run out of audio) is not decoded at once while it has slack: a job
starts when some waiting block is due within :data:`DEFER_MARGIN_S` plus twice the recent job time,
or when :data:`SHARED_CALL_STREAMS` sessions have blocks waiting; it then takes the next block of every
waiting session, due or not. One timer on the event loop (``call_at``, no thread) starts the job for the earliest due
block. The decoder is latency-bound for a few blocks (the published decoder's ODE step costs about
as much for eight blocks as for three), so answers generated faster than they play cost far fewer,
fuller calls, and a new turn's first block finds the decoder free sooner. Blocks without ``due``
(a first block, whose listener waits now; an answer returned whole) start a job at once.

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
DEFER_MARGIN_S = 0.5
"""A block submitted with ``due`` starts its job at the latest this long, plus twice the recent job
duration (:attr:`BlockBatcher.latency_s`), before it is due."""
SHARED_CALL_STREAMS = 8
"""Sessions with blocks waiting at which a job starts although none is due yet: the published
decoder's ODE step for eight 140-token rows costs 2.5 times one row's (H100: 12.1 against 4.8 ms)."""


@dataclass
class _Entry:
    """One session's blocks waiting for a decoder job, with a future for each block's PCM."""

    stream: Any
    blocks: list[list[int]]
    futures: list[asyncio.Future]
    first: bool = False
    """``blocks[0]`` is the stream's first block (nothing decoded yet when it was queued)."""
    due: float | None = None
    """Loop time at which the listener needs ``blocks[0]`` (None: now)."""
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
        self._timer: asyncio.TimerHandle | None = None
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

    async def feed(self, stream: Any, codes: Sequence[int], due: float | None = None) -> np.ndarray:
        """``stream.feed(codes)``, decoded together with the other sessions' waiting blocks."""
        return await self.submit(stream, [codes], due)[0]

    def submit(self, stream: Any, blocks: Sequence[Sequence[int]], due: float | None = None) -> list[asyncio.Future]:
        """Queue one stream's blocks, to be decoded in order; a future for each block's PCM (or its
        error; a block after a failed one gets that failure). ``due``: the loop time
        (``loop.time()``) at which the listener needs the first of them; None: now. Cancel the
        futures of a turn that stops: a job not yet started then drops its blocks."""
        loop = asyncio.get_running_loop()
        if not self._batched:  # the single worker runs its jobs in order
            return [loop.run_in_executor(self.worker, stream.feed, list(codes)) for codes in blocks]
        first = getattr(stream, "tokens_decoded", None) == 0
        entry = _Entry(
            stream, [list(codes) for codes in blocks], [loop.create_future() for _ in blocks], first, due=due
        )
        if entry.blocks:
            self._waiting.append(entry)
            self._consider(loop)
        return entry.futures

    def start_by(self, entry: _Entry) -> float:
        """Loop time by which a job holding ``entry``'s next block must start (-inf: at once)."""
        if entry.due is None:
            return float("-inf")
        return entry.due - DEFER_MARGIN_S - 2 * (self.latency_s or 0.0)

    def _consider(self, loop: asyncio.AbstractEventLoop) -> None:
        """With the decoder idle: a job now if a waiting block is due or enough sessions wait to share
        a call; otherwise a timer for the earliest due block."""
        if self._running:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting = [e for e in self._waiting if not all(f.done() for f in e.futures)]  # a cancelled turn's dropped
        if not self._waiting:
            return
        firsts = [e for e in self._waiting if e.first]
        if firsts:  # listeners waiting for their first audio go before everyone else, in a call of their own
            self._start(loop, firsts)
            return
        start_at = min(self.start_by(e) for e in self._waiting)
        sharing = min(SHARED_CALL_STREAMS, self.max_batch or SHARED_CALL_STREAMS)
        if start_at <= loop.time() or len(self._waiting) >= sharing:
            self._start(loop, self._waiting)
        else:
            self._timer = loop.call_at(start_at, self._consider, loop)

    def _start(self, loop: asyncio.AbstractEventLoop, entries: list[_Entry]) -> None:
        self._waiting = [e for e in self._waiting if e not in entries]
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
        """On the worker: the next block of each entry, in one ``feed_many`` call (a job is one call:
        blocks that arrive meanwhile, first blocks above all, need not wait for a session's later ones)."""
        # a session whose turn stopped meanwhile (its futures cancelled on the loop) is not decoded
        members = [e for e in entries if not e.futures[0].done()]
        if not members:
            return

        def deliver(index: int, result: Any) -> None:  # as each batch finishes
            entry = members[index]
            if isinstance(result, BaseException):
                entry.failure = result
            future = entry.futures[0]
            future.get_loop().call_soon_threadsafe(_settle, future, result)

        jobs = [(e.stream, e.blocks[0]) for e in members]
        self.calls += 1  # before any result reaches a session, which may then read the counts
        self.jobs += len(jobs)
        make_way = self.make_way if any(e.first for e in members) else None
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
        later = []
        for entry in entries:  # each entry's next block was delivered through ``deliver``, unless it failed
            failure = error or entry.failure
            _settle(entry.futures[0], failure or RuntimeError("the block was not decoded"))
            if failure is None and len(entry.blocks) > 1:  # its later blocks wait for the next job, in order
                later.append(_Entry(entry.stream, entry.blocks[1:], entry.futures[1:], due=entry.due))
            else:
                for future in entry.futures[1:]:
                    _settle(future, failure or RuntimeError("the block was not decoded"))
        self._waiting = later + self._waiting
        self._consider(loop)


def _settle(future: asyncio.Future, result: Any) -> None:
    """A block's PCM or exception to its waiting session (unless that turn was cancelled)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
