"""BlockBatcher: blocks that wait together are decoded in one feed_many call; results and errors
reach the right session; a cancelled session's block is dropped."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from glm4voice.block_batcher import FINISH_DUE_S, BlockBatcher

from support import until


class GatedDecoder:
    """feed_many that records its jobs and waits for the test to open a gate before returning."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.gates: list[threading.Event] = []
        self.entered = threading.Semaphore(0)

    def feed_many(self, jobs, on_result=None, max_batch=None):
        self.calls.append([stream for stream, _ in jobs])
        gate = threading.Event()
        self.gates.append(gate)
        self.entered.release()
        assert gate.wait(10)
        results = []
        for index, (stream, codes) in enumerate(jobs):
            result = (
                ValueError(f"bad codes for {stream}")
                if stream == "bad"
                else np.full(len(codes), len(codes), np.float32)
            )
            results.append(result)
            if on_result is not None:
                on_result(index, result)
        return results


async def _wait_entered(decoder: GatedDecoder) -> None:
    await asyncio.get_running_loop().run_in_executor(None, decoder.entered.acquire)


def test_waiting_blocks_share_one_call_and_get_their_own_results():
    async def scenario():
        decoder = GatedDecoder()
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker)
            first = asyncio.create_task(batcher.feed("a", [1, 2]))
            await _wait_entered(decoder)  # "a" is being decoded alone
            later = [asyncio.create_task(batcher.feed(name, [1] * n)) for name, n in (("b", 3), ("bad", 1), ("c", 4))]
            await asyncio.sleep(0.05)
            assert decoder.calls == [["a"]], "blocks must wait for the running call, not start their own"
            decoder.gates[0].set()
            np.testing.assert_array_equal(await first, [2, 2])
            await _wait_entered(decoder)
            assert decoder.calls[1] == ["b", "bad", "c"]
            decoder.gates[1].set()
            b, bad, c = await asyncio.gather(*later, return_exceptions=True)
            assert len(b) == 3 and len(c) == 4
            assert isinstance(bad, ValueError) and "bad" in str(bad)
            assert (batcher.calls, batcher.jobs) == (2, 4)  # counted before the results were delivered
            await until(lambda: batcher.idle, "the job never finished")
            assert 0 < batcher.fastest_s <= batcher.latency_s  # call durations are tracked
            assert 0 < batcher.block_s < batcher.latency_s  # and per block: the second call had three

    asyncio.run(scenario())


def test_a_cancelled_sessions_block_is_dropped_and_a_crash_reaches_every_job():
    class Crashing(GatedDecoder):
        def feed_many(self, jobs, on_result=None, max_batch=None):
            super().feed_many([(stream, []) for stream, _ in jobs], None, max_batch)  # records, waits
            raise RuntimeError("device lost")

    async def scenario():
        decoder = Crashing()
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker)
            first = asyncio.create_task(batcher.feed("a", [1]))
            await _wait_entered(decoder)
            gone = asyncio.create_task(batcher.feed("gone", [1]))
            kept = asyncio.create_task(batcher.feed("kept", [1]))
            await asyncio.sleep(0.01)
            gone.cancel()
            decoder.gates[0].set()
            with pytest.raises(RuntimeError, match="device lost"):
                await first
            await _wait_entered(decoder)
            assert decoder.calls[1] == ["kept"]
            decoder.gates[1].set()
            with pytest.raises(RuntimeError, match="device lost"):
                await kept

    asyncio.run(scenario())


def test_a_decoder_without_feed_many_is_fed_block_by_block():
    class Stream:
        def __init__(self):
            self.fed = []

        def feed(self, codes):
            self.fed.append(codes)
            return np.zeros(len(codes), np.float32)

    async def scenario():
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(object(), worker)
            stream = Stream()
            assert len(await batcher.feed(stream, (5, 6, 7))) == 3
            assert stream.fed == [[5, 6, 7]] and batcher.calls == 0

    asyncio.run(scenario())


def test_a_streams_waiting_blocks_are_decoded_in_order():
    """Blocks sessions hand over together: the k-th of every session in the k-th feed_many call after
    (never merged, never reordered); a failed block stops the ones after it, in that stream only."""

    async def scenario():
        decoder = GatedDecoder()
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker)
            busy = asyncio.create_task(batcher.feed("busy", [1]))
            await _wait_entered(decoder)  # a job runs: what follows waits for the next one
            a = batcher.submit("a", [[1] * 10, [1] * 16, [1] * 26])
            bad = batcher.submit("bad", [[1] * 10, [1] * 16])
            c = batcher.submit("c", [[1] * 10])
            decoder.gates[0].set()
            await busy
            for _ in range(3):  # three calls
                await _wait_entered(decoder)
                decoder.gates[-1].set()
            assert decoder.calls[1:] == [["a", "bad", "c"], ["a"], ["a"]]
            assert [len(await f) for f in a] == [10, 16, 26] and len(await c[0]) == 10
            for future in bad:
                with pytest.raises(ValueError, match="bad codes"):
                    await future
            assert (batcher.calls, batcher.jobs) == (4, 6)
            assert batcher.submit("nothing", []) == []

    asyncio.run(scenario())


def test_a_turn_that_stops_during_a_job_loses_its_later_blocks():
    """A session cancels its blocks' futures while its first block is decoded (the user interrupted the
    answer): the next calls decode only the other sessions' blocks."""

    async def scenario():
        decoder = GatedDecoder()
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker)
            busy = asyncio.create_task(batcher.feed("busy", [1]))
            await _wait_entered(decoder)
            stopped = batcher.submit("stopped", [[1] * 10, [1] * 16, [1] * 26])
            kept = batcher.submit("kept", [[1] * 10, [1] * 16])
            decoder.gates[0].set()
            await busy
            await _wait_entered(decoder)  # the next call: both sessions
            for future in stopped:
                future.cancel()
            decoder.gates[-1].set()
            await _wait_entered(decoder)  # the call after: the stopped turn's block is gone
            decoder.gates[-1].set()
            assert [len(await f) for f in kept] == [10, 16]
            assert decoder.calls[1:] == [["stopped", "kept"], ["kept"]]
            assert (batcher.calls, batcher.jobs) == (3, 4)

    asyncio.run(scenario())


def test_blocks_after_the_worker_shut_down_fail_instead_of_waiting_forever():
    """The pipeline closes (its decode worker shut down) while a job runs: the blocks that waited for
    the next job, and blocks submitted later, end with an error; nothing is left unanswered."""

    async def scenario():
        decoder = GatedDecoder()
        worker = ThreadPoolExecutor(1)
        batcher = BlockBatcher(decoder, worker)
        running = batcher.submit("running", [[1, 2]])
        await _wait_entered(decoder)
        waiting = batcher.submit("waiting", [[1], [1, 2]])
        worker.shutdown(wait=False, cancel_futures=True)
        decoder.gates[0].set()
        assert len(await running[0]) == 2  # the job that was running finishes
        outcomes = await asyncio.gather(*waiting, *batcher.submit("later", [[1]]), return_exceptions=True)
        assert all(isinstance(o, RuntimeError) and "shut down" in str(o) for o in outcomes), outcomes
        assert batcher.idle and decoder.calls == [["running"]]
        worker.shutdown(wait=True)

    asyncio.run(scenario())


class _Named(str):
    """A stream name that also says how many tokens its stream has decoded (what the batcher reads)."""

    tokens_decoded: int


def _stream(name: str, tokens_decoded: int) -> _Named:
    stream = _Named(name)
    stream.tokens_decoded = tokens_decoded
    return stream


class MakeWayDecoder(GatedDecoder):
    """A GatedDecoder beside a ``make_way`` that it records: whether each call ran inside it."""

    def __init__(self):
        super().__init__()
        self.held = 0
        """make_way contexts open now."""
        self.inside: list[bool] = []

    @contextlib.contextmanager
    def make_way(self):
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    def feed_many(self, jobs, on_result=None, max_batch=None):
        self.inside.append(self.held > 0)
        return super().feed_many(jobs, on_result, max_batch)


def test_a_call_with_a_first_block_runs_inside_make_way():
    """One-process layout: a feed_many call that decodes a stream's first block runs inside make_way
    (the LLM engine of the process starts no step meanwhile); calls of later blocks run outside it.
    Without make_way nothing changes."""

    async def scenario():
        decoder = MakeWayDecoder()
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker, make_way=decoder.make_way)
            old = batcher.submit(_stream("old", 10), [[1] * 16])  # call 1: a later block alone
            await _wait_entered(decoder)
            new = batcher.submit(_stream("new", 0), [[1] * 10, [1] * 16])  # a first block, then its second
            other = batcher.submit(_stream("other", 26), [[1] * 26])
            decoder.gates[0].set()
            await old[0]
            for _ in range(3):
                await _wait_entered(decoder)
                decoder.gates[-1].set()
            assert [len(await f) for f in (*new, *other)] == [10, 16, 26]
            # the first block goes alone, ahead of the block that waited with it; the block handed over
            # with it (its listener waits for both) goes next, also alone and inside make_way
            assert decoder.calls == [["old"], ["new"], ["new"], ["other"]]
            assert decoder.inside == [False, True, True, False] and decoder.held == 0

            plain = BlockBatcher(decoder, worker)  # no make_way: the one-process layout's engine is elsewhere
            task = asyncio.create_task(plain.feed(_stream("first", 0), [1]))
            await _wait_entered(decoder)
            decoder.gates[-1].set()
            await task
            assert decoder.inside[-1] is False

    asyncio.run(scenario())


def test_blocks_a_listener_waits_for_go_with_the_first_blocks_when_the_caller_says_so():
    """``submit(first=True)``: a stream with audio decoded already (a held first block decoded at once)
    whose next block its listener waits for: it goes in the next job of first blocks, ahead of the later
    blocks that waited before it, and inside make_way; ``first=False`` does the opposite for a new stream."""

    async def scenario():
        decoder = MakeWayDecoder()
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker, make_way=decoder.make_way)
            running = batcher.submit(_stream("running", 10), [[1] * 16])
            await _wait_entered(decoder)
            later = batcher.submit(_stream("later", 26), [[1] * 26])
            waited = batcher.submit(_stream("waited", 10), [[1] * 16], first=True)
            fresh = batcher.submit(_stream("fresh", 0), [[1] * 10], first=False)
            decoder.gates[0].set()
            await running[0]
            for _ in range(2):
                await _wait_entered(decoder)
                decoder.gates[-1].set()
            assert [len(await f[0]) for f in (waited, later, fresh)] == [16, 26, 10]
            assert decoder.calls == [["running"], ["waited"], ["later", "fresh"]]
            assert decoder.inside == [False, True, False] and decoder.held == 0

    asyncio.run(scenario())


class PausingDecoder(MakeWayDecoder):
    """feed_many whose call with a ``pause`` (a job of the batcher's) stands aside once, when the test
    opens ``go``, then returns when it opens ``resume``; calls without one (blocks cutting in) return at once."""

    def __init__(self, failing: str | None = None, gated: str | None = None):
        super().__init__()
        self.go, self.paused, self.resume = threading.Event(), threading.Event(), threading.Event()
        self.failing = failing
        self.gated = gated
        """A stream whose call (one without a pause) waits for ``gate_open``, after setting ``gate_entered``."""
        self.gate_entered, self.gate_open = threading.Event(), threading.Event()

    def feed_many(self, jobs, on_result=None, max_batch=None, pause=None):
        names = [stream for stream, _ in jobs]
        self.calls.append(names)
        self.inside.append(self.held > 0)
        if pause is not None:
            self.entered.release()
            assert self.go.wait(10)
            pause()
            self.paused.set()
            assert self.resume.wait(10)
        elif self.failing in names:
            raise RuntimeError("device lost while cutting in")
        elif self.gated in names:
            self.gate_entered.set()
            assert self.gate_open.wait(10)
        results = [np.full(len(codes), len(codes), np.float32) for _, codes in jobs]
        for index, result in enumerate(results):
            if on_result is not None:
                on_result(index, result)
        return results


def test_a_first_block_cuts_into_the_running_job():
    """With cut_in, a first block that arrives while a job of later blocks runs is decoded at the job's
    next pause point (inside make_way) and reaches its session before the job ends; the block handed
    over with it goes in the next job, then the blocks that waited."""

    async def scenario():
        decoder = PausingDecoder()
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker, make_way=decoder.make_way, cut_in=True)
            old = batcher.submit(_stream("old", 10), [[1] * 16])
            await _wait_entered(decoder)
            new = batcher.submit(_stream("new", 0), [[1] * 10, [1] * 16])
            other = batcher.submit(_stream("other", 26), [[1] * 26])
            decoder.go.set()
            assert len(await new[0]) == 10  # while the job of "old" is still running
            assert not decoder.resume.is_set() and not old[0].done() and not batcher.idle
            decoder.resume.set()
            assert [len(await f) for f in (*old, new[1], *other)] == [16, 16, 26]
            assert decoder.calls == [["old"], ["new"], ["new"], ["other"]]
            assert decoder.inside == [False, True, True, False]  # the blocks of "new" ran inside make_way
            assert batcher.cut_ins == 1 and (batcher.calls, batcher.jobs) == (4, 4)
            await until(lambda: batcher.idle, "the last job never finished")
            assert batcher.latency_s is not None and batcher.block_s is not None

    asyncio.run(scenario())


def test_first_blocks_after_the_last_pause_point_are_decoded_after_the_call_or_first_in_the_next_job():
    """A first block that arrives after the call's last pause point is decoded as soon as the call
    returns, on the worker; one that arrives after that goes first in the next job."""

    async def scenario():
        decoder = PausingDecoder(gated="late")
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker, cut_in=True)
            old = batcher.submit(_stream("old", 10), [[1] * 16])
            await _wait_entered(decoder)
            decoder.go.set()
            await loop.run_in_executor(None, decoder.paused.wait, 10)  # its pause point is behind it
            other = batcher.submit(_stream("other", 26), [[1] * 26])
            late = batcher.submit(_stream("late", 0), [[1] * 10])
            decoder.resume.set()
            await loop.run_in_executor(None, decoder.gate_entered.wait, 10)  # "late" decoded after the call
            last = batcher.submit(_stream("last", 0), [[1] * 10])
            decoder.gate_open.set()
            assert [len(await f) for f in (*old, *late, *last, *other)] == [16, 10, 10, 26]
            assert decoder.calls == [["old"], ["late"], ["last"], ["other"]] and batcher.cut_ins == 1

    asyncio.run(scenario())


def test_a_failure_while_cutting_in_stays_with_those_blocks():
    """The decoder call of blocks cutting in raises: those blocks (and the ones after them) get the
    error; the running job and the other sessions go on."""

    async def scenario():
        decoder = PausingDecoder(failing="bad")
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker, cut_in=True)
            old = batcher.submit(_stream("old", 10), [[1] * 16])
            await _wait_entered(decoder)
            bad = batcher.submit(_stream("bad", 0), [[1] * 10, [1] * 16])
            decoder.go.set()
            decoder.resume.set()
            assert len(await old[0]) == 16
            for future in bad:
                with pytest.raises(RuntimeError, match="cutting in"):
                    await future
            after = await batcher.feed(_stream("after", 0), [1] * 10)
            assert len(after) == 10 and decoder.calls[-1] == ["after"]

    asyncio.run(scenario())


class StoppingDecoder(MakeWayDecoder):
    """feed_many that decodes its jobs one batch each, in order. The call of "a" waits for ``gate``;
    between two batches it sets ``boundary`` and waits for ``go_on``, then, given ``stop``, ends there if
    ``stop()`` says so (the jobs left get no result)."""

    def __init__(self):
        super().__init__()
        self.gate, self.boundary, self.go_on = threading.Event(), threading.Event(), threading.Event()
        self.given_stop: list[bool] = []

    def feed_many(self, jobs, on_result=None, max_batch=None, stop=None):
        self.calls.append([stream for stream, _ in jobs])
        self.inside.append(self.held > 0)
        self.given_stop.append(stop is not None)
        if self.calls[-1] == ["a"]:
            assert self.gate.wait(10)
        results = []
        for index, (_, codes) in enumerate(jobs):
            if index:
                self.boundary.set()
                assert self.go_on.wait(10)
                if stop is not None and stop():
                    break
            results.append(np.full(len(codes), len(codes), np.float32))
            if on_result is not None:
                on_result(index, results[-1])
        return results


@pytest.mark.parametrize("yield_to_first", [True, False])
def test_a_job_of_later_blocks_yields_to_a_first_block_between_its_batches(yield_to_first):
    """``yield_to_first``: a first block queued while a job of three later blocks runs ends that job after
    its current batch; the blocks it did not decode go back as they were and are decoded after the first
    block, in their order. Without it the first block waits for the whole job (and the job is not asked)."""

    async def scenario():
        decoder = StoppingDecoder()
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker, make_way=decoder.make_way, yield_to_first=yield_to_first)
            a = batcher.submit(_stream("a", 10), [[1] * 16])
            later = [
                batcher.submit(_stream(name, 26), [[1] * size]) for name, size in (("b", 26), ("c", 30), ("d", 40))
            ]
            decoder.gate.set()
            await a[0]
            await asyncio.get_running_loop().run_in_executor(None, decoder.boundary.wait)
            new = batcher.submit(_stream("new", 0), [[1] * 10])  # while the job of b, c, d runs
            decoder.go_on.set()
            assert [len(await f[0]) for f in (*later, new)] == [26, 30, 40, 10]
            await until(lambda: batcher.idle, "the last job never finished")
            return decoder, batcher

    decoder, batcher = asyncio.run(scenario())
    if yield_to_first:
        assert decoder.calls == [["a"], ["b", "c", "d"], ["new"], ["c", "d"]]
        assert decoder.inside == [False, False, True, False] and decoder.given_stop == [True, True, False, True]
        assert batcher.yields == 1 and (batcher.calls, batcher.jobs) == (4, 5)
    else:
        assert decoder.calls == [["a"], ["b", "c", "d"], ["new"]] and not any(decoder.given_stop)
        assert batcher.yields == 0 and (batcher.calls, batcher.jobs) == (3, 5)


class HandshakeDecoder:
    """The real decoder; a call given ``stop`` waits at its first batch boundary until the test opens
    ``go_on`` (after ``boundary``), so a first block is queued there; the call of ``held`` waits for ``gate``."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.held = None
        self.gate, self.boundary, self.go_on = threading.Event(), threading.Event(), threading.Event()
        self.calls: list[list] = []

    def feed_many(self, jobs, on_result=None, max_batch=None, stop=None):
        self.calls.append([stream for stream, _ in jobs])
        if self.held in self.calls[-1]:
            assert self.gate.wait(30)
        asked = []

        def at_boundary() -> bool:
            if not asked:
                asked.append(True)
                self.boundary.set()
                assert self.go_on.wait(30)
            return stop()

        return self.decoder.feed_many(jobs, on_result, max_batch, stop=at_boundary if stop else None)


def test_blocks_a_yielding_job_did_not_decode_sound_as_if_it_had(tiny_checkpoints):
    """The real decoder (one batch per shape) behind a batcher with ``yield_to_first``: three streams'
    later blocks of three shapes share a job; a new stream's first block queued at the job's first batch
    boundary ends it there, goes next, and the two blocks left follow. Every stream hears exactly what it
    hears decoded alone, block by block."""
    from flow_inference import AudioDecoder

    decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", mixed_batches=False)
    codes = np.random.default_rng(1).integers(0, decoder.num_codes, 60).tolist()
    sizes = {3: 20, 4: 25, 5: 16}  # each stream's second block; the first is 10 codes

    def alone(seed: int, blocks: list[list[int]]) -> np.ndarray:
        stream = decoder.stream(seed=seed)
        return np.concatenate([stream.feed(block) for block in blocks] + [stream.finish()])

    async def scenario():
        handshake = HandshakeDecoder(decoder)
        streams = {seed: decoder.stream(seed=seed) for seed in (*sizes, 6, 7)}
        heard = {seed: [decoder.feed_many([(streams[seed], codes[:10])])[0]] for seed in (*sizes, 7)}
        handshake.held = streams[7]
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(handshake, worker, yield_to_first=True)
            held = batcher.submit(streams[7], [codes[10:30]])  # a job of its own: the others wait together
            later = {seed: batcher.submit(streams[seed], [codes[10 : 10 + size]]) for seed, size in sizes.items()}
            handshake.gate.set()
            heard[7].append(await held[0])
            await asyncio.get_running_loop().run_in_executor(None, handshake.boundary.wait)
            new = batcher.submit(streams[6], [codes[:10]])
            handshake.go_on.set()
            heard[6] = [await new[0]]
            for seed, futures in later.items():
                heard[seed].append(await futures[0])
            await until(lambda: batcher.idle, "the last job never finished")
            return streams, heard, batcher.yields, handshake.calls

    streams, heard, yields, calls = asyncio.run(scenario())
    assert yields == 1 and calls[2] == [streams[6]] and len(calls[1]) == 3 and len(calls[3]) == 2
    second = {seed: codes[10 : 10 + size] for seed, size in sizes.items()} | {7: codes[10:30]}
    for seed, pieces in heard.items():
        blocks = [codes[:10]] + ([second[seed]] if seed in second else [])  # stream 6: its first block only
        together = np.concatenate(pieces + [streams[seed].finish()])
        np.testing.assert_array_equal(together, alone(seed, blocks))


class OrderDecoder:
    """feed_many that logs its call ("feed", streams) and gives every block a result; the first call
    waits for ``gate``."""

    def __init__(self, log: list):
        self.log = log
        self.gate = threading.Event()

    def feed_many(self, jobs, on_result=None, max_batch=None, stop=None):
        self.log.append(("feed", [str(stream) for stream, _ in jobs]))
        if len(self.log) == 1:
            assert self.gate.wait(10)
        for index, (_, codes) in enumerate(jobs):
            on_result(index, np.full(len(codes), len(codes), np.float32))


class FinishingStream(_Named):
    """A stream whose ``finish()`` logs ("finish", name) and returns three samples; the one given
    ``entered`` and ``go_on`` sets the first and waits for the second before it returns."""

    log: list
    entered: threading.Event | None = None
    go_on: threading.Event | None = None

    def finish(self):
        self.log.append(("finish", str(self)))
        if self.entered is not None and self.go_on is not None:
            self.entered.set()
            assert self.go_on.wait(10)
        return np.zeros(3, np.float32)


def _finishing(name: str, log: list, gated: bool = False) -> FinishingStream:
    stream = FinishingStream(name)
    stream.tokens_decoded, stream.log = 40, log
    if gated:
        stream.entered, stream.go_on = threading.Event(), threading.Event()
    return stream


@pytest.mark.parametrize("yield_to_first", [True, False])
def test_finishes_wait_behind_first_blocks_and_yield_to_them(yield_to_first):
    """Two finishes queued while a job of a later block runs go in the next job, after its blocks (here
    none); a first block queued while the first finish runs goes before the second with
    ``yield_to_first`` (the second goes back to the queue), after it without. Each finish's result
    reaches its future; finishes make no feed_many call and are counted apart."""

    async def scenario():
        log: list = []
        decoder = OrderDecoder(log)
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker, yield_to_first=yield_to_first)
            a = batcher.submit(_stream("a", 30), [[1] * 26])
            x, y = _finishing("x", log, gated=True), _finishing("y", log)
            finished = [batcher.finish(x), batcher.finish(y)]  # while "a" is decoded
            decoder.gate.set()
            await a[0]
            await asyncio.get_running_loop().run_in_executor(None, x.entered.wait)
            new = batcher.submit(_stream("new", 0), [[1] * 10])  # while x finishes
            x.go_on.set()
            results = await asyncio.gather(*finished, new[0])
            await until(lambda: batcher.idle, "the last job never finished")
            return log, results, batcher

    log, results, batcher = asyncio.run(scenario())
    assert [len(r) for r in results] == [3, 3, 10]
    if yield_to_first:
        assert log == [("feed", ["a"]), ("finish", "x"), ("feed", ["new"]), ("finish", "y")]
    else:
        assert log == [("feed", ["a"]), ("finish", "x"), ("finish", "y"), ("feed", ["new"])]
    assert (batcher.calls, batcher.jobs, batcher.finishes) == (2, 2, 2)


def test_a_queued_finish_of_a_stopped_turn_is_dropped_and_a_failing_one_fails_alone():
    """A finish whose turn stopped before its job is not run; a finish that raises gives its error to
    its own future, and the next finish of the same job still runs."""

    class Broken(FinishingStream):
        def finish(self):
            super().finish()
            raise ValueError("broken tail")

    async def scenario():
        log: list = []
        decoder = OrderDecoder(log)
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker)
            a = batcher.submit(_stream("a", 30), [[1] * 26])
            broken = Broken("broken")
            broken.tokens_decoded, broken.log = 40, log
            gone, bad, ok = (batcher.finish(s) for s in (_finishing("gone", log), broken, _finishing("ok", log)))
            gone.cancel()
            decoder.gate.set()
            await a[0]
            with pytest.raises(ValueError, match="broken tail"):
                await bad
            assert len(await ok) == 3
            await until(lambda: batcher.idle, "the last job never finished")
            return log, batcher

    log, batcher = asyncio.run(scenario())
    assert log == [("feed", ["a"]), ("finish", "broken"), ("finish", "ok")]
    assert batcher.finishes == 2


def test_a_finish_nearly_due_goes_with_the_first_blocks_and_does_not_yield():
    """Queued while a later block is decoded: a finish whose listener has half a second left goes in
    the next job with the first block, one with a minute left after it. In a job of finishes, once a
    first block waits, the finish with a minute left yields and the one nearly due does not."""

    async def scenario():
        log: list = []
        decoder = OrderDecoder(log)
        with ThreadPoolExecutor(1) as worker:
            batcher = BlockBatcher(decoder, worker, yield_to_first=True)
            loop = asyncio.get_running_loop()
            a = batcher.submit(_stream("a", 30), [[1] * 26])
            relaxed = batcher.finish(_finishing("relaxed", log), due=loop.time() + 60)
            soon = batcher.finish(_finishing("soon", log), due=loop.time() + FINISH_DUE_S / 2)
            first = batcher.submit(_stream("first", 0), [[1] * 10])
            decoder.gate.set()
            await asyncio.gather(a[0], relaxed, soon, first[0])
            await until(lambda: batcher.idle, "the last job never finished")
            # a job of three finishes (queued while another finish runs), a first block arriving during its first
            running, gated = _finishing("running", log, gated=True), _finishing("gated", log, gated=True)
            finishes = [batcher.finish(running)]
            await loop.run_in_executor(None, running.entered.wait)
            finishes += [
                batcher.finish(gated),
                batcher.finish(_finishing("far", log), due=loop.time() + 60),
                batcher.finish(_finishing("near", log), due=loop.time() + FINISH_DUE_S / 2),
            ]
            running.go_on.set()
            await loop.run_in_executor(None, gated.entered.wait)
            new = batcher.submit(_stream("new", 0), [[1] * 10])
            gated.go_on.set()
            await asyncio.gather(*finishes, new[0])
            await until(lambda: batcher.idle, "the last job never finished")
            return log

    log = asyncio.run(scenario())
    assert log[:4] == [("feed", ["a"]), ("feed", ["first"]), ("finish", "soon"), ("finish", "relaxed")]
    assert log[4:] == [
        ("finish", "running"),
        ("finish", "gated"),
        ("finish", "near"),
        ("feed", ["new"]),
        ("finish", "far"),
    ]
