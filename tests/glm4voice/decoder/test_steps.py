"""AudioDecoder.tick: streams' blocks that join the ODE between steps sound as each stream fed alone;
stopped streams leave, bad jobs are answered at once, the other streams go on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flow_inference import AudioDecoder, DecoderError
from glm4voice.decoder.steps import StepJob


@pytest.fixture(scope="module")
def decoder(tiny_checkpoints) -> AudioDecoder:
    return AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu")


def codes_for(decoder: AudioDecoder, seed: int, count: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, decoder.num_codes, count).tolist()


def fed_alone(decoder: AudioDecoder, codes: list[int], sizes: list[int], seed: int) -> list[np.ndarray]:
    """Each block's audio from ``stream.feed``, then the tail from ``finish``."""
    stream = decoder.stream(seed=seed)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(stream.feed(codes[start : start + size]))
        start += size
    return pieces + [stream.finish()]


class Streams:
    """Streams that hand ``decoder.tick`` their next block once the last one came back, each starting
    at its own tick."""

    def __init__(self, decoder: AudioDecoder, schedules: dict[int, list[int]], starts: dict[int, int]):
        self.decoder = decoder
        self.schedules = schedules
        self.starts = starts
        self.codes = {seed: codes_for(decoder, seed, sum(sizes)) for seed, sizes in schedules.items()}
        self.streams = {seed: decoder.stream(seed=seed) for seed in schedules}
        self.heard: dict[int, list] = {seed: [] for seed in schedules}
        self.sent = dict.fromkeys(schedules, 0)
        self.waiting: set[int] = set()
        self.stopped: set[int] = set()

    def jobs(self, tick: int) -> list[StepJob]:
        jobs = []
        for seed, sizes in self.schedules.items():
            index = self.sent[seed]
            if tick < self.starts[seed] or seed in self.waiting or seed in self.stopped or index == len(sizes):
                continue
            start = sum(sizes[:index])
            jobs.append(StepJob(self.streams[seed], self.codes[seed][start : start + sizes[index]],
                                self.reply_to(seed), lambda seed=seed: seed not in self.stopped))  # fmt: skip
            self.sent[seed] += 1
            self.waiting.add(seed)
        return jobs

    def reply_to(self, seed: int):
        def reply(result) -> None:
            self.heard[seed].append(result)
            self.waiting.discard(seed)

        return reply

    def run(self, on_tick=None) -> int:
        """Tick until every stream sent all its blocks and the decoder holds none; returns the ticks."""
        tick = 0
        while True:
            if on_tick is not None:
                on_tick(tick, self)
            in_hand = self.decoder.tick(self.jobs(tick))
            tick += 1
            done = all(self.sent[s] == len(z) or s in self.stopped for s, z in self.schedules.items())
            if in_hand == 0 and done and not self.waiting - self.stopped:
                return tick
            assert tick < 1000, "the decoder never finished"


def test_streams_decoded_between_steps_sound_as_each_fed_alone(decoder):
    schedules = {1: [10, 20, 40], 2: [10, 30], 3: [20, 20, 20, 20], 4: [15, 40], 5: [26, 13]}
    starts = {1: 0, 2: 2, 3: 3, 4: 7, 5: 7}
    before = decoder.stats.snapshot()
    streams = Streams(decoder, schedules, starts)
    streams.run()
    figures = decoder.stats.since(before)
    for seed, sizes in schedules.items():
        assert len(streams.heard[seed]) == len(sizes)
        tail = streams.streams[seed].finish()  # the stream goes on with feed/finish after the ticks
        alone = fed_alone(decoder, streams.codes[seed], sizes, seed)
        for got, want in zip(streams.heard[seed] + [tail], alone):
            assert not isinstance(got, Exception), got
            assert got.shape == want.shape and got.size
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # the later blocks went through the steps and shared some (first blocks run as calls of their own)
    assert figures["step_blocks"] == sum(len(s) - 1 for s in schedules.values())
    assert figures["mean_step_rows"] > 1


def test_a_stopped_stream_leaves_the_steps_and_the_others_go_on(decoder):
    schedules = {7: [10, 30, 30], 8: [10, 30, 30], 9: [10, 30]}
    streams = Streams(decoder, schedules, dict.fromkeys(schedules, 0))

    def stop(tick: int, streams: Streams) -> None:
        # a tick after a second block went in, it is in the decoder's hands (not done: it needs more steps)
        if 7 in streams.waiting and streams.sent[7] == 2 and 7 not in streams.stopped:
            streams.stopped.add(7)  # its turn stops
        if 9 in streams.waiting and streams.sent[9] == 2 and not streams.streams[9].finished:
            streams.streams[9].close()  # its stream is closed

    streams.run(stop)
    assert isinstance(streams.heard[7][-1], RuntimeError) and "stopped" in str(streams.heard[7][-1])
    assert isinstance(streams.heard[9][-1], RuntimeError)
    for got, want in zip(streams.heard[8], fed_alone(decoder, streams.codes[8], schedules[8], 8)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert decoder.tick([]) == 0


def test_bad_jobs_are_answered_at_once(decoder):
    stream = decoder.stream(seed=3)
    heard = []
    jobs = [
        StepJob(stream, [decoder.num_codes + 5] * 10, heard.append),  # out of range
        StepJob(decoder.stream(seed=4), [1, 2, 3], heard.append),  # fewer than a block: nothing yet
    ]
    assert decoder.tick(jobs) == 0
    assert isinstance(heard[0], DecoderError) and "code" in str(heard[0])
    assert isinstance(heard[1], np.ndarray) and heard[1].size == 0
    busy = decoder.stream(seed=5)
    twice = [
        StepJob(busy, codes_for(decoder, 5, 10), heard.append),
        StepJob(busy, codes_for(decoder, 6, 10), heard.append),
    ]
    decoder.tick(twice)  # the second job is refused at once, before the first is decoded
    assert isinstance(heard[2], RuntimeError) and "two threads at once" in str(heard[2])
    assert isinstance(heard[3], np.ndarray) and heard[3].size


@pytest.mark.gpu
def test_steps_replay_graphs_and_sound_as_fed_alone_on_the_gpu(tiny_checkpoints):
    """With CUDA graphs: after warm_up, streams of the schedule's sizes through ticks capture nothing
    new and sound as each fed alone (eager)."""
    sizes = (10, 20, 40)
    graphed = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cuda", prompt_window=30,
                                           graph_batch_sizes=(1, 2, 4), step_batching=True)  # fmt: skip
    eager = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cuda", prompt_window=30, cuda_graphs=False)
    graphed.warm_up(sizes)
    shapes = graphed.captured_graphs
    assert {rows for rows, _ in shapes["steps"]} == {1, 2, 4}
    schedules = {1: [10, 20, 40, 40, 40], 2: [10, 20, 40, 40], 3: [10, 20, 40], 4: [10, 20, 40, 40]}
    streams = Streams(graphed, schedules, {1: 0, 2: 1, 3: 4, 4: 9})
    streams.run()
    for seed, sizes_of in schedules.items():
        tail = streams.streams[seed].finish()
        for got, want in zip(streams.heard[seed] + [tail], fed_alone(eager, streams.codes[seed], sizes_of, seed)):
            np.testing.assert_allclose(got, want, rtol=0, atol=5e-3)
    assert graphed.captured_graphs == shapes
    assert torch.cuda.is_available()
