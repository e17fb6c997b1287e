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
and its first audio, never the other sessions' queued blocks. The blocks handed over together with a
first block (a turn's pacing may hold its first block back until the next one is cut: the listener
then starts with both) are first blocks in this sense too: each goes in the next job of first
blocks, not in a batch with every other session's waiting block. So is a block the caller marks
(``submit(first=True)``): the pipeline marks the block after a first block, which the listener
waits for with only the short first chunk in hand, or nothing. (Later blocks would wait only while
new first blocks kept arriving during every first-block call, tens of milliseconds each on an H100.)

A decoder without ``feed_many`` (test doubles) gets one ``stream.feed`` call per block instead.

**First blocks cut in** (``cut_in``): a first block that arrives while a job runs need not wait for
the job's end. The job's decoder call stands aside at its next pause point (between the ODE's steps
of its later blocks, before their vocoder, between its batches; ``AudioDecoder.feed_many``'s
``pause``) and decodes the waiting first blocks there, on the worker, before it goes on; and once
more when the call has returned: a new turn waits for one ODE step, not for a whole call. First blocks
that arrive after that go first in the next job, as without it.

**Later jobs yield** (``yield_to_first``): the same wait shortened without decoding inside another
call: a job of later blocks ends between its batches (``AudioDecoder.feed_many``'s ``stop``) once a
first block waits; the blocks of its batches left are not decoded (their streams are as before the
call) and go back to the queue as they were, ahead of the later blocks that waited, and the first
blocks go next. A new turn waits for one batch, not for a whole call.

**Finishes** (:meth:`BlockBatcher.finish`): an answer's last decode (its pending tokens and the tail
the decoder held back, ``stream.finish()``) waits in the queue as a later block does and runs on the
worker after the job's ``feed_many`` call, one stream at a time: first blocks go before it, and with
``yield_to_first`` the finishes not yet run go back to the queue once a first block waits. (Run
straight on the worker instead, a burst of answers ending puts each finish, 10-15 ms on an H200,
between a waiting first block and its call.) A finish given a ``due`` (when its listener runs out of
audio without it) that is less than :data:`FINISH_DUE_S` away when a job starts goes in that job, a
job of first blocks too, and does not yield: a burst of starting turns cannot keep an answer's tail
waiting until its listener has heard everything else.

``make_way`` (the one-process layout's ``InProcessTokenClient.make_way``): a call that decodes a
stream's first block runs inside it, so that the LLM engine of this process starts no new step
meanwhile and a listener's first audio does not share the GPU with generation (first blocks that cut
in run inside it too).
"""

from __future__ import annotations

import asyncio
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
FINISH_DUE_S = 1.0
"""A queued finish whose listener runs out of audio sooner than this goes in the next job and does not
yield (:meth:`BlockBatcher.finish`)."""


@dataclass(eq=False)
class _Entry:
    """One session's blocks waiting for a decoder job, with a future for each block's PCM."""

    stream: Any
    blocks: list[list[int]]
    futures: list[asyncio.Future]
    first: bool = False
    """The stream's listener waits for every one of these blocks: they start with the stream's first
    block (nothing decoded yet when they were queued), or the caller said so (``submit(first=True)``)."""
    failure: BaseException | None = field(default=None)
    """Set on the worker when one of the blocks failed: the blocks after it are not decoded."""
    stopped: bool = False
    """Set on the worker when the job ended before this entry's batch (``yield_to_first``): its stream
    is as before the job, and the entry goes back to the queue as it was."""
    finish: bool = False
    """No blocks: the stream's ``finish()``, whose result is the one future's (:meth:`BlockBatcher.finish`)."""
    due: float | None = None
    """A finish's: the loop's time when its listener runs out of audio without it (None: not known)."""

    def due_soon(self) -> bool:
        """A finish whose listener runs out of audio within :data:`FINISH_DUE_S` (any thread may ask)."""
        if self.due is None:
            return False
        return self.due - self.futures[0].get_loop().time() < FINISH_DUE_S


class BlockBatcher:
    """Shared by every session of one event loop (the web demo's); ``max_batch`` None: the decoder's
    largest graphed batch, a number: jobs of at most that many blocks, 1: blocks one at a time (what
    :meth:`feed` then costs is measured by bench/e2e.py)."""

    def __init__(
        self,
        decoder: Any,
        worker: Executor,
        max_batch: int | None = None,
        *,
        make_way: Callable[[], AbstractContextManager[None]] | None = None,
        cut_in: bool = False,
        yield_to_first: bool = False,
    ):
        """``cut_in``: first blocks cut into the running job at its pause points (the decoder's
        ``feed_many`` must take ``pause``). ``yield_to_first``: a job of later blocks ends between its
        batches once a first block waits (the decoder's ``feed_many`` must take ``stop``)."""
        self.decoder = decoder
        self.worker = worker
        self.max_batch = max_batch
        self.make_way = make_way
        self.cut_in = cut_in
        self.yield_to_first = yield_to_first
        self._first_waiting = threading.Event()
        """Set on the loop when a first block is queued while a job runs, cleared when a job starts; the
        worker reads it between the batches of a job of later blocks (``yield_to_first``)."""
        self.yields = 0
        """Jobs of later blocks that ended early for first blocks (``yield_to_first``)."""
        self._batched = hasattr(decoder, "feed_many")
        self._waiting: list[_Entry] = []
        self._running = False
        self._cut_in_lock = threading.Lock()
        """Guards the two lists below, which the loop's ``submit`` and the worker's pause points share."""
        self._to_cut_in: list[_Entry] = []
        """First blocks that arrived while the job ran, for its next pause point."""
        self._cut_in_done: list[_Entry] = []
        """Those the running job decoded at a pause point (settled with the job's own when it ends)."""
        self._cut_in_s = 0.0
        """The running job's time spent decoding them (not the job's own duration)."""
        self.cut_ins = 0
        """First blocks decoded at a pause point of another job."""
        self.latency_s: float | None = None
        """Moving average of a decoder job's duration, what a block waits for once it is taken."""
        self.fastest_s: float | None = None
        """The quickest job so far (a small block on an otherwise idle decoder)."""
        self.block_s: float | None = None
        """Moving average of a job's duration per block in it: what each running turn's next block adds
        to a round of jobs that decodes them all."""
        self.calls = 0
        """``feed_many`` calls made; with ``jobs`` below: the mean batch a listener shared. Counted on the
        worker before the call's results are delivered."""
        self.jobs = 0
        """Blocks decoded by those calls."""
        self.finishes = 0
        """Streams finished on the worker (:meth:`finish`)."""
        self._finish_s = 0.0
        """The running job's time spent in finishes (not in the latency of its blocks)."""

    @property
    def idle(self) -> bool:
        """No decoder job is running (its duration is then in ``latency_s`` and ``fastest_s``)."""
        return not self._running

    async def feed(self, stream: Any, codes: Sequence[int]) -> np.ndarray:
        """``stream.feed(codes)``, decoded together with the other sessions' waiting blocks."""
        return await self.submit(stream, [codes])[0]

    def finish(self, stream: Any, due: float | None = None) -> asyncio.Future:
        """``stream.finish()`` on the worker, queued behind the first blocks waiting (see the module's
        doc); a future for its PCM (or error). Call it once every block submitted for the stream has
        been decoded; cancel the future of a turn that stops (a finish not yet started is dropped).
        ``due``: the loop's time when the listener runs out of audio without it (None: not known); less
        than :data:`FINISH_DUE_S` away, the finish goes in the next job and does not yield."""
        loop = asyncio.get_running_loop()
        if not self._batched:
            return loop.run_in_executor(self.worker, stream.finish)
        entry = _Entry(stream, [], [loop.create_future()], finish=True, due=due)
        self._waiting.append(entry)
        self._consider(loop)
        return entry.futures[0]

    def submit(self, stream: Any, blocks: Sequence[Sequence[int]], first: bool | None = None) -> list[asyncio.Future]:
        """Queue one stream's blocks, to be decoded in order; a future for each block's PCM (or its
        error; a block after a failed one gets that failure). Cancel the futures of a turn that
        stops: a job not yet started then drops its blocks. ``first``: the listener waits for these
        blocks to start, so they go with the first blocks (None: when they start the stream, i.e.
        nothing of it is decoded yet)."""
        loop = asyncio.get_running_loop()
        if not self._batched:  # the single worker runs its jobs in order
            return [loop.run_in_executor(self.worker, stream.feed, list(codes)) for codes in blocks]
        if first is None:
            first = getattr(stream, "tokens_decoded", None) == 0
        entry = _Entry(stream, [list(codes) for codes in blocks], [loop.create_future() for _ in blocks], first)
        if not entry.blocks:
            return entry.futures
        if first and self.cut_in and self._running:
            with self._cut_in_lock:
                self._to_cut_in.append(entry)
            return entry.futures
        self._waiting.append(entry)
        if first and self._running:
            self._first_waiting.set()
        self._consider(loop)
        return entry.futures

    def _consider(self, loop: asyncio.AbstractEventLoop) -> None:
        """With the decoder idle, start the next job: the waiting first blocks if any, else the next
        block of every waiting session."""
        if self._running:
            return
        self._waiting = [e for e in self._waiting if not all(f.done() for f in e.futures)]  # a cancelled turn's dropped
        if not self._waiting:
            return
        if any(e.first for e in self._waiting):  # listeners waiting for their first audio go first, with the
            entries: list[_Entry] = []  # finishes whose listeners are about to run out (one pass: time goes on)
            rest: list[_Entry] = []
            for entry in self._waiting:
                (entries if entry.first or (entry.finish and entry.due_soon()) else rest).append(entry)
            self._waiting = rest
        else:
            entries, self._waiting = self._waiting, []
        self._start(loop, entries)

    def _start(self, loop: asyncio.AbstractEventLoop, entries: list[_Entry]) -> None:
        started = loop.time()
        self._first_waiting.clear()  # this job takes every first block waiting, or there is none
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
        self._cut_in_s = self._finish_s = 0.0
        blocks = [e for e in entries if not e.finish]
        if blocks:
            self._feed(blocks, self._decode_cutting_in if self.cut_in else None)
        if self.cut_in:  # those that came during the call's last part: now, not after a trip through the loop
            self._decode_cutting_in()
        self._finish_streams([e for e in entries if e.finish])

    def _finish_streams(self, entries: list[_Entry]) -> None:
        """On the worker, after the job's blocks: each entry's ``stream.finish()``, its result to its
        future; with ``yield_to_first``, once a first block waits the rest are left for a later job
        (but those nearly due)."""
        started = time.perf_counter()
        for entry in entries:
            future = entry.futures[0]
            if future.done():  # the turn stopped
                continue
            if self.yield_to_first and self._first_waiting.is_set() and not entry.due_soon():
                entry.stopped = True
                continue
            try:
                result: Any = entry.stream.finish()
            except Exception as error:  # noqa: BLE001 - that stream's failure, the others go on
                result = entry.failure = error
            self.finishes += 1
            future.get_loop().call_soon_threadsafe(_settle, future, result)
        self._finish_s = time.perf_counter() - started

    def _decode_cutting_in(self) -> None:
        """On the worker, at a pause point of the running job: decode the first blocks waiting to cut in."""
        with self._cut_in_lock:
            entries, self._to_cut_in = self._to_cut_in, []
            self._cut_in_done += entries
        if not entries:
            return
        started = time.perf_counter()
        try:
            self._feed(entries, None)
        except Exception as error:  # noqa: BLE001 - those blocks fail, the running job goes on
            logger.error("decoding first blocks at a pause point failed: %r", error)
            for entry in entries:
                entry.failure = entry.failure or error
        self.cut_ins += len(entries)
        self._cut_in_s += time.perf_counter() - started

    def _feed(self, entries: list[_Entry], pause: Callable[[], None] | None) -> None:
        """On the worker: one ``feed_many`` call for the next block of each entry."""
        # a session whose turn stopped meanwhile (its futures cancelled on the loop) is not decoded
        members = [e for e in entries if not e.futures[0].done()]
        if not members:
            return

        delivered: set[int] = set()

        def deliver(index: int, result: Any) -> None:  # as each batch finishes
            delivered.add(index)
            entry = members[index]
            if isinstance(result, BaseException):
                entry.failure = result
            future = entry.futures[0]
            future.get_loop().call_soon_threadsafe(_settle, future, result)

        jobs = [(e.stream, e.blocks[0]) for e in members]
        self.calls += 1  # before any result reaches a session, which may then read the counts
        self.jobs += len(jobs)
        firsts = any(e.first for e in members)
        make_way = self.make_way if firsts else None
        options: dict[str, Any] = {"pause": pause} if pause is not None else {}
        if self.yield_to_first and not firsts:
            options["stop"] = self._first_waiting.is_set
        with make_way() if make_way is not None else nullcontext():
            self.decoder.feed_many(jobs, on_result=deliver, max_batch=self.max_batch, **options)
        if "stop" in options and len(delivered) < len(members):  # the call ended before their batches
            for index, entry in enumerate(members):
                entry.stopped = index not in delivered
            self.jobs -= len(members) - len(delivered)
            self.yields += 1

    def _finished(self, loop: asyncio.AbstractEventLoop, entries: list[_Entry], call: asyncio.Future, seconds: float) -> None:  # fmt: skip
        self._running = False
        with self._cut_in_lock:  # the worker is done with them
            cut_in, self._cut_in_done = self._cut_in_done, []
            not_yet, self._to_cut_in = self._to_cut_in, []  # arrived after the job's last pause point
        seconds -= self._cut_in_s + self._finish_s
        back = [e for e in entries if e.stopped]  # not decoded: queued again, as they were
        for entry in back:
            entry.stopped = False
        entries = [e for e in entries if e not in back]
        decoded = sum(1 for e in entries if not e.finish)
        if decoded:  # a job of finishes only says nothing about the blocks' latency
            self.latency_s = (
                seconds if self.latency_s is None else (1 - LATENCY_WEIGHT) * self.latency_s + LATENCY_WEIGHT * seconds
            )
            self.fastest_s = seconds if self.fastest_s is None else min(self.fastest_s, seconds)
            per_block = seconds / decoded
            self.block_s = (
                per_block if self.block_s is None else (1 - LATENCY_WEIGHT) * self.block_s + LATENCY_WEIGHT * per_block
            )
        error = None if call.cancelled() else call.exception()
        if error is not None:  # feed_many itself failed (a bug): every block of the job hears of it
            logger.error("batched block decode failed: %r", error)
        later: list[_Entry] = []
        # each entry's next block was delivered through ``deliver``, unless it failed; blocks that cut in
        # were decoded by calls of their own (a failure of the job's call after them is not theirs)
        for entry, job_error in [(e, error) for e in entries] + [(e, None) for e in cut_in]:
            failure = job_error or entry.failure
            _settle(entry.futures[0], failure or RuntimeError("the block was not decoded"))
            if failure is None and len(entry.blocks) > 1:  # its later blocks wait for the next job, in order
                later.append(_Entry(entry.stream, entry.blocks[1:], entry.futures[1:], entry.first))
            else:
                for future in entry.futures[1:]:
                    _settle(future, failure or RuntimeError("the block was not decoded"))
        self._waiting = later + back + not_yet + self._waiting
        self._consider(loop)


def _settle(future: asyncio.Future, result: Any) -> None:
    """A block's PCM or exception to its waiting session (unless that turn was cancelled)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
