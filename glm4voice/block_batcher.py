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
and its first audio, never the other sessions' queued blocks. (Later blocks would wait only while new
first blocks kept arriving during every first-block call, tens of milliseconds each on an H100.)

**Blocks that join between steps** (a decoder whose ``step_batching`` is on; off by default).
Instead of whole-solve jobs, the worker runs ``AudioDecoder.tick`` calls: each is one boundary of the
decoder's ODE (rows that finished leave, new blocks join) and a few steps, and the worker queues the next
tick behind whatever else was queued on it meanwhile (a stream's ``finish``, a new stream) until no
block is left in hand. Every session's next block joins at the next boundary (a few milliseconds);
first blocks still run at once as calls of their own. Here a session's blocks wait in
:class:`BlockBatcher` until its previous one is done, so they still reach the decoder in order.

A decoder without ``feed_many`` (test doubles) gets one ``stream.feed`` call per block instead.

``make_way`` (the one-process layout's ``InProcessTokenClient.make_way``): a call that decodes a
stream's first block runs inside it, so that the LLM engine of this process starts no new step
meanwhile and a listener's first audio does not share the GPU with generation.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

LATENCY_WEIGHT = 0.3
"""Weight of the newest job in :attr:`BlockBatcher.latency_s`."""


@dataclass(eq=False)
class _Entry:
    """One session's blocks waiting for a decoder job, with a future for each block's PCM."""

    stream: Any
    blocks: list[list[int]]
    futures: list[asyncio.Future]
    first: bool = False
    """``blocks[0]`` is the stream's first block (nothing decoded yet when it was queued)."""
    in_flight: float | None = None
    """Stepped decoding: when ``blocks[0]`` went to the decoder (None: it waits here)."""
    failure: BaseException | None = field(default=None)
    """Set on the worker when one of the blocks failed: the blocks after it are not decoded."""


class BlockBatcher:
    """Shared by every session of one event loop (the web demo's); ``max_batch`` None: the decoder's
    largest graphed batch (blocks join between steps when the decoder's ``step_batching`` is on), a
    number: whole-solve jobs of at most that many blocks, 1: blocks one at a time (what :meth:`feed`
    then costs is measured by bench/e2e.py)."""

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
        # an explicit max_batch asks for whole-solve jobs of at most that many blocks
        self._stepped = (
            max_batch is None and bool(getattr(decoder, "step_batching", False)) and hasattr(decoder, "tick")
        )
        self._waiting: list[_Entry] = []
        self._running = False
        self._lock = threading.Lock()
        """Stepped decoding: guards ``_waiting``, ``_running`` and the entries (the loop submits, the worker takes)."""
        self.latency_s: float | None = None
        """Moving average of a decoder job's duration (stepped: of a block's time in the decoder), what a
        block waits for once it is taken."""
        self.fastest_s: float | None = None
        """The quickest job (stepped: block) so far (a small block on an otherwise idle decoder)."""
        self.block_s: float | None = None
        """Moving average of a job's duration per block in it (whole-solve jobs only): what each running
        turn's next block adds to a round of jobs that decodes them all."""
        self.calls = 0
        """``feed_many`` calls made (stepped: ticks that took new blocks); with ``jobs`` below: the mean
        batch a listener shared. Counted on the worker before the call's results are delivered."""
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
        if not entry.blocks:
            return entry.futures
        if self._stepped:
            with self._lock:
                self._waiting.append(entry)
                start = not self._running
                self._running = True
            if start:
                self._queue_tick()
            return list(entry.futures)  # the entry's own list shrinks as its blocks are answered
        self._waiting.append(entry)
        self._consider(loop)
        return entry.futures

    # ---- stepped decoding (decoder.tick) -----------------------------------------------------------
    def _queue_tick(self) -> None:
        """Run :meth:`_tick` on the worker, after what is queued there already."""
        try:
            self.worker.submit(self._tick)
        except RuntimeError as error:  # the worker was shut down (the pipeline is closing)
            with self._lock:
                entries, self._waiting, self._running = self._waiting, [], False
            for entry in entries:
                for future in entry.futures:
                    future.get_loop().call_soon_threadsafe(
                        _settle, future, RuntimeError(f"the audio decoder is shut down: {error}")
                    )

    def _tick(self) -> None:
        """On the worker: hand the decoder every session's next block (unless its previous one is still
        in the decoder) and run one tick; queue the next while blocks are in hand or waiting. A failed
        tick (a bug in the decoder) fails the blocks it held."""
        from glm4voice.decoder.steps import StepJob  # the decoder package imports torch

        with self._lock:
            for entry in self._waiting:  # a stopped turn's blocks that wait here are dropped
                while entry.in_flight is None and entry.futures and entry.futures[0].done():
                    entry.futures.pop(0)
                    entry.blocks.pop(0)
            self._waiting = [e for e in self._waiting if e.futures]
            now = time.perf_counter()
            jobs = []
            for entry in self._waiting:
                if entry.in_flight is None:
                    entry.in_flight = now
                    wanted = functools.partial(_pending, entry.futures[0])
                    jobs.append(StepJob(entry.stream, entry.blocks[0], self._reply_to(entry), wanted))
        if jobs:
            self.calls += 1
            self.jobs += len(jobs)
        try:
            in_hand = self.decoder.tick(jobs, self.make_way)
        except Exception as error:
            logger.exception("a decoder tick failed")
            with self._lock:
                failed = [e for e in self._waiting if e.in_flight is not None]
            for entry in failed:
                self._reply_to(entry)(error)
            in_hand = 0
        with self._lock:
            more = in_hand > 0 or any(e.in_flight is None for e in self._waiting)
            self._running = more
        if more:
            self._queue_tick()

    def _reply_to(self, entry: _Entry) -> Callable[[Any], None]:
        def reply(result: Any) -> None:  # on the worker, from inside decoder.tick
            with self._lock:
                if entry.in_flight is None:  # already answered (a failed tick)
                    return
                seconds = time.perf_counter() - entry.in_flight
                entry.in_flight = None
                settled = [(entry.futures.pop(0), result)]
                entry.blocks.pop(0)
                if isinstance(result, BaseException):  # its later blocks are not decoded
                    settled += [(f, result) for f in entry.futures]
                    entry.blocks, entry.futures = [], []
                if not entry.blocks:
                    self._waiting = [e for e in self._waiting if e is not entry]
            if not isinstance(result, BaseException) and len(result):
                self.latency_s = (
                    seconds
                    if self.latency_s is None
                    else (1 - LATENCY_WEIGHT) * self.latency_s + LATENCY_WEIGHT * seconds
                )
                self.fastest_s = seconds if self.fastest_s is None else min(self.fastest_s, seconds)
            for future, value in settled:
                future.get_loop().call_soon_threadsafe(_settle, future, value)

        return reply

    def _consider(self, loop: asyncio.AbstractEventLoop) -> None:
        """With the decoder idle, start the next job: the waiting first blocks if any, else the next
        block of every waiting session."""
        if self._running:
            return
        self._waiting = [e for e in self._waiting if not all(f.done() for f in e.futures)]  # a cancelled turn's dropped
        if not self._waiting:
            return
        firsts = [e for e in self._waiting if e.first]  # listeners waiting for their first audio go first
        if firsts:
            entries, self._waiting = firsts, [e for e in self._waiting if not e.first]
        else:
            entries, self._waiting = self._waiting, []
        self._start(loop, entries)

    def _start(self, loop: asyncio.AbstractEventLoop, entries: list[_Entry]) -> None:
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
        per_block = seconds / len(entries)
        self.block_s = (
            per_block if self.block_s is None else (1 - LATENCY_WEIGHT) * self.block_s + LATENCY_WEIGHT * per_block
        )
        error = None if call.cancelled() else call.exception()
        if error is not None:  # feed_many itself failed (a bug): every block of the job hears of it
            logger.error("batched block decode failed: %r", error)
        later: list[_Entry] = []
        for entry in entries:  # each entry's next block was delivered through ``deliver``, unless it failed
            failure = error or entry.failure
            _settle(entry.futures[0], failure or RuntimeError("the block was not decoded"))
            if failure is None and len(entry.blocks) > 1:  # its later blocks wait for the next job, in order
                later.append(_Entry(entry.stream, entry.blocks[1:], entry.futures[1:]))
            else:
                for future in entry.futures[1:]:
                    _settle(future, failure or RuntimeError("the block was not decoded"))
        self._waiting = later + self._waiting
        self._consider(loop)


def _pending(future: asyncio.Future) -> bool:
    """Whether a block's session still waits for it (read on the worker: a cancelled turn's future is done)."""
    return not future.done()


def _settle(future: asyncio.Future, result: Any) -> None:
    """A block's PCM or exception to its waiting session (unless that turn was cancelled)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
