"""The graphed paths on the CPU: a stand-in for CUDA graph capture (it re-runs the captured function on
the same static buffers at each replay) checks the bookkeeping around the graphs (batch padding, static
buffers, per-shape graphs, fallbacks) and that the functions the GPU captures compute what the eager
decoder computes. The GPU tests (tests/test_flow_inference.py, marked gpu) replay real graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosyvoice.flow.cuda_graph import DEFAULT_EXACT_FRAMES
from flow_inference import AudioDecoder
from glm4voice.decoder.blocks import BlockGeometry, commit_block, take_block
from glm4voice.decoder.graphs import FirstBlockGraphs, GraphedFunction, LaterBlockGraphs
from glm4voice.decoder.options import DEFAULT_GRAPH_BATCH_SIZES, N_TIMESTEPS
from glm4voice.decoder.synthesis import BlockSynthesizer


class StandInCapture:
    """capture(fn, static, pool, warm_up) on the CPU: replay re-runs fn on the static inputs and writes
    into the static outputs (what a graph replay does); records every capture."""

    def __init__(self):
        self.captured: list[tuple] = []

    def __call__(self, fn, static, pool, warm_up, runs=0):
        warm_up(*static)
        outputs = tuple(out.clone() for out in fn(*static))
        self.captured.append(tuple(tuple(x.shape) for x in static))

        def replay():
            for out, new in zip(outputs, fn(*static)):
                out.copy_(new)

        return replay, outputs


def test_graphed_function_pads_batches_and_captures_once_per_shape():
    capture = StandInCapture()
    calls = []

    def fn(x, y):
        calls.append(x.shape[0])
        return (x * 2 + y, x.sum(dim=1))

    graphed = GraphedFunction("test", fn, (1, 2, 4), pool=None, capture=capture)
    x, y = torch.arange(12.0).view(3, 4), torch.ones(3, 4)
    for _ in range(2):
        doubled, summed = graphed(x, y)
        assert torch.equal(doubled, x * 2 + y) and torch.equal(summed, x.sum(dim=1))
    assert capture.captured == [((4, 4), (4, 4))]  # batch 3 runs in the graph of 4 rows, captured once
    graphed(x[:1], y[:1])
    graphed(torch.ones(2, 5), torch.ones(2, 5))  # another shape: another graph
    assert graphed.captured_shapes == [(1, (4,), (4,)), (2, (5,), (5,)), (4, (4,), (4,))]
    calls.clear()
    assert torch.equal(graphed(torch.ones(5, 4), torch.ones(5, 4))[1], torch.full((5,), 4.0))  # no size fits: eager
    assert calls == [5] and len(capture.captured) == 3
    # the rows past the batch are zeros, whatever ran before
    graphed(torch.full((4, 4), 7.0), torch.ones(4, 4))
    doubled, _ = graphed(x[:3], y[:3])
    assert torch.equal(doubled, x * 2 + y)


def test_graphed_function_stops_capturing_past_its_byte_budget():
    capture = StandInCapture()
    # one graph of batch 2 x 8 float32: 64 B of input, 64 B of output; the budget is reached after it
    graphed = GraphedFunction("test", lambda x: (x + 1,), (2,), pool=None, capture=capture, max_bytes=128)
    assert torch.equal(graphed(torch.zeros(2, 8))[0], torch.ones(2, 8))
    assert graphed.static_bytes == 128
    assert torch.equal(graphed(torch.zeros(2, 3))[0], torch.ones(2, 3))  # a new shape past the budget: eager
    assert torch.equal(graphed(torch.zeros(1, 8))[0], torch.ones(1, 8))  # a captured shape still replays
    assert len(capture.captured) == 1 and graphed.captured_shapes == [(2, (8,))]


def test_graphed_function_captures_a_shape_at_its_nth_use():
    capture = StandInCapture()
    graphed = GraphedFunction("test", lambda x: (x * 3,), (1, 2), pool=None, capture=capture, capture_after=2)
    x = torch.arange(4.0).view(1, 4)
    assert torch.equal(graphed(x)[0], x * 3) and not capture.captured  # first use: eager
    assert torch.equal(graphed(x)[0], x * 3) and capture.captured == [((1, 4),)]  # second: captured
    assert torch.equal(graphed(x + 1)[0], (x + 1) * 3) and len(capture.captured) == 1  # replayed
    assert torch.equal(graphed(torch.ones(2, 4))[0], torch.full((2, 4), 3.0)) and len(capture.captured) == 1


def test_graphed_function_falls_back_variant_by_variant():
    capture = StandInCapture()

    def broken(x):
        raise RuntimeError("this variant cannot be captured")

    def plain(x):
        return (x + 1,)

    graphed = GraphedFunction("test", [broken, plain], (2,), pool=None, capture=capture)
    assert torch.equal(graphed(torch.zeros(2, 3))[0], torch.ones(2, 3))
    assert capture.captured == [((2, 3),)]  # the second variant was captured

    def failing_capture(fn, static, pool, warm_up):
        raise RuntimeError("operation not permitted when stream is capturing")

    eager_calls = []
    graphed = GraphedFunction("test", plain, (2,), pool=None, eager=lambda x: eager_calls.append(1) or plain(x), capture=failing_capture)  # fmt: skip
    for _ in range(2):
        assert torch.equal(graphed(torch.zeros(2, 3))[0], torch.ones(2, 3))
    assert eager_calls == [1, 1] and graphed.captured_shapes == []  # eager from then on, not retried


@pytest.fixture(scope="module")
def decoder(tiny_checkpoints) -> AudioDecoder:
    return AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu")


def first_blocks_of(decoder, seeds, codes, finalize=False):
    geometry = BlockGeometry(decoder.block_size, float(decoder.flow.input_frame_rate))
    states = [decoder.new_state(seed=seed) for seed in seeds]
    for state in states:
        state.pending.extend(codes)
    return states, [take_block(state, geometry, finalize) for state in states]


@pytest.mark.parametrize("finalize", [False, True])
def test_first_block_graphs_compute_what_the_eager_decoder_computes(decoder, finalize):
    """Whole first blocks through the graphed stages (flow with its ODE, then the vocoder fed with
    randomness drawn beforehand) give the eager decoder's audio, mel and carried state, batch by batch."""
    capture = StandInCapture()
    graphs = FirstBlockGraphs(
        decoder.flow, decoder.hift, N_TIMESTEPS, (1, 2, 4), DEFAULT_EXACT_FRAMES, None, capture=capture
    )
    graphed = BlockSynthesizer(
        decoder.flow, decoder.hift, decoder.solver.eager, decoder.device, decoder.mel_overlap_len, True, graphs
    )  # fmt: skip
    eager = decoder.synthesizer
    assert eager.first_blocks is None  # the CPU decoder runs eagerly
    codes = np.random.default_rng(1).integers(0, decoder.num_codes, 10).tolist()
    with torch.inference_mode():
        for seeds in ((1,), (2, 3, 4)):
            _, blocks = first_blocks_of(decoder, seeds, codes, finalize)
            _, eager_blocks = first_blocks_of(decoder, seeds, codes, finalize)
            assert graphed.graphed(blocks)
            results = graphed.run(blocks)
            expected = eager.run(eager_blocks)
            for got, want, block, eager_block in zip(results, expected, blocks, eager_blocks):
                torch.testing.assert_close(got.speech, want.speech, rtol=0, atol=1e-5)
                torch.testing.assert_close(got.mel, want.mel, rtol=0, atol=1e-5)
                for name in ("mel_overlap", "cache_mel", "cache_source", "cache_speech"):
                    a, b = getattr(block.carry, name), getattr(eager_block.carry, name)
                    assert (a is None) == (b is None) == finalize, name
                    if a is not None:
                        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    frames = decoder.mel_frames(10)
    vocoded = frames if finalize else frames - decoder.mel_overlap_len
    flow_shapes = [(rows, (10,), (80, frames), (192,)) for rows in (1, 4)]
    vocoder_shapes = [(rows, (80, vocoded), (9, 1), (9, vocoded * 256)) for rows in (1, 4)]
    assert graphs.flow_graphs.captured_shapes == flow_shapes and graphs.vocoder_graphs.captured_shapes == vocoder_shapes


def test_only_first_blocks_take_the_graphs(decoder):
    graphs = FirstBlockGraphs(decoder.flow, decoder.hift, N_TIMESTEPS, (1, 2), DEFAULT_EXACT_FRAMES, None, capture=StandInCapture())  # fmt: skip
    synth = BlockSynthesizer(decoder.flow, decoder.hift, decoder.solver.eager, decoder.device, 34, True, graphs)
    codes = list(range(30))
    _, blocks = first_blocks_of(decoder, (1, 2), codes[:10])
    assert synth.graphed(blocks) and not synth.graphed(blocks + blocks[:1])  # 3 > the largest graphed batch
    _, long = first_blocks_of(decoder, (1,), codes[:11])  # 75 frames: longer than a first block
    assert not synth.graphed(long)
    states, blocks = first_blocks_of(decoder, (1,), codes[:10])
    with torch.inference_mode():
        synth.run(blocks)
        states[0].pending.extend(codes[10:20])
        geometry = BlockGeometry(decoder.block_size, float(decoder.flow.input_frame_rate))
        second = take_block(states[0], geometry, False)  # prompt-less here (nothing committed), but carried state
    assert not synth.graphed([second])


def test_later_block_graphs_compute_what_the_eager_decoder_computes(decoder):
    """Later blocks (prompt, carried source) through the graphed encoder and vocoder (a mixed batch of 3
    in the encoder graph of 4, the vocoder per length; two blocks of one shape; a final block alone) give
    the eager decoder's audio and carries; first blocks (nothing carried) stay eager."""
    capture = StandInCapture()
    graphs = LaterBlockGraphs(decoder.flow, decoder.hift, (1, 2, 4, 64), None, capture=capture)
    assert graphs.batch_sizes == (1, 2, 4) and graphs.serves(4) and not graphs.serves(5)  # 64: too large
    graphed = BlockSynthesizer(decoder.flow, decoder.hift, decoder.solver.eager, decoder.device,
                               decoder.mel_overlap_len, True, later_blocks=graphs)  # fmt: skip
    geometry = BlockGeometry(decoder.block_size, float(decoder.flow.input_frame_rate))
    codes = np.random.default_rng(3).integers(0, decoder.num_codes, 90).tolist()
    # {stream: (first code, end)} per call: first blocks; later blocks of different lengths (a mixed
    # batch of 3); later blocks of one shape (2 rows); one stream's final block
    calls = [{0: (0, 10), 1: (0, 10), 2: (0, 10)}, {0: (10, 30), 1: (10, 30), 2: (10, 22)},
             {0: (30, 50), 1: (30, 50)}, {2: (22, 90)}]  # fmt: skip
    runs = {}
    with torch.inference_mode(), graphs.capturing_at_first_use():
        for name, synth in (("graphed", graphed), ("eager", decoder.synthesizer)):
            states = [decoder.new_state(seed=seed) for seed in (1, 2, 3)]
            heard = []
            for call in calls:
                blocks = []
                for stream, (start, end) in call.items():
                    states[stream].pending.extend(codes[start:end])
                    blocks.append(take_block(states[stream], geometry, finalize=end == 90))
                for stream, block, out in zip(call, blocks, synth.run(blocks)):
                    commit_block(states[stream], geometry, block, out)
                    heard.append((out.speech, out.mel, block.carry.cache_source))
            runs[name] = heard
    assert len(runs["graphed"]) == 9
    for (speech, mel, source), (speech_e, mel_e, source_e) in zip(runs["graphed"], runs["eager"]):
        torch.testing.assert_close(speech, speech_e, rtol=0, atol=1e-4)
        torch.testing.assert_close(mel, mel_e, rtol=0, atol=1e-4)
        assert (source is None) == (source_e is None)
        if source is not None:
            torch.testing.assert_close(source, source_e, rtol=0, atol=1e-4)
    # the encoder: padded shapes (tokens to 32, frames to 128); the vocoder: exact lengths
    assert {shape[0] for shape in graphs.encoder_graphs.captured_shapes} == {1, 2, 4}
    assert all(shape[1][0] % 32 == 0 and shape[4][0] % 128 == 0 for shape in graphs.encoder_graphs.captured_shapes)
    assert {shape[0] for shape in graphs.vocoder_graphs.captured_shapes} == {1, 2}


def test_graph_options(tiny_checkpoints):
    decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu")
    assert (
        decoder.graph_batch_sizes == DEFAULT_GRAPH_BATCH_SIZES == (1, 2, 4, 8, 16, 32, 64) and decoder.max_batch == 64
    )
    assert decoder.captured_graphs == {
        "ode": [], "first_block_flow": [], "first_block_vocoder": [], "later_encoder": [], "later_vocoder": [],
    }  # fmt: skip
    assert decoder.synthesizer.later_blocks is None  # the CPU decoder runs eagerly
    custom = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", graph_batch_sizes=[8, 1, 2, 8])
    assert custom.graph_batch_sizes == (1, 2, 8) and custom.max_batch == 8
    for bad, message in (
        ({"graph_batch_sizes": ()}, "graph_batch_sizes"),
        ({"graph_batch_sizes": (0, 4)}, "graph_batch_sizes"),
        ({"graph_first_blocks": True}, "graph_first_blocks"),
        ({"graph_later_blocks": True}, "graph_later_blocks"),
        ({"compile_first_blocks": "fastest"}, "compile_first_blocks"),
        ({"cuda_graphs": True}, "CUDA"),
    ):
        with pytest.raises(ValueError, match=message):
            AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", **bad)


def two_streams_fed_together(decoder, codes, sizes):
    """Streams of seeds 1 and 2 fed the same codes in blocks of ``sizes``, each block of both in one
    ``feed_many`` call; returns the streams and the PCM of each block, per stream."""
    streams = [decoder.stream(seed=s) for s in (1, 2)]
    pieces = [[] for _ in streams]
    start = 0
    for size in sizes:
        for piece, pcm in zip(pieces, decoder.feed_many([(s, codes[start : start + size]) for s in streams])):
            piece.append(pcm)
        start += size
    return streams, pieces


def test_decoder_with_first_block_graphs_streams_batches_and_warms_up(tiny_checkpoints, monkeypatch):
    """The decoder's wiring of the first-block graphs (stand-in capture on the CPU): warm_up captures
    the first block of every graphed batch size, streams then capture nothing more, and the audio is the
    eager decoder's."""
    import glm4voice.decoder.graphs as graphs_module
    from glm4voice.decoder.options import DecoderOptions

    eager = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", graph_batch_sizes=(1, 2))
    capture = StandInCapture()
    monkeypatch.setattr(graphs_module, "cuda_capture", capture)
    monkeypatch.setattr(DecoderOptions, "use_first_block_graphs", lambda self, device: True)
    graphed = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", graph_batch_sizes=(1, 2))
    assert graphed.synthesizer.first_blocks is not None and eager.synthesizer.first_blocks is None
    graphed.warm_up((10, 20))
    shapes = graphed.captured_graphs
    assert [s[0] for s in shapes["first_block_flow"]] == [1, 2] and [s[0] for s in shapes["first_block_vocoder"]] == [
        1,
        2,
    ]
    codes = np.random.default_rng(2).integers(0, graphed.num_codes, 40).tolist()
    results = {}
    for name, decoder in (("graphed", graphed), ("eager", eager)):
        streams, pieces = two_streams_fed_together(decoder, codes, (10, 20, 10))
        results[name] = [np.concatenate(p + [s.finish()]) for p, s in zip(pieces, streams)]
    for a, b in zip(results["graphed"], results["eager"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert graphed.captured_graphs == shapes  # nothing captured while streaming


def test_decoder_with_later_block_graphs_warms_up_each_batch_size(tiny_checkpoints, monkeypatch):
    """The decoder's wiring of the later-block graphs (stand-in capture on the CPU): warm_up
    captures the schedule's later blocks for every graphed batch size; streams that follow the schedule
    capture nothing more, nor does a block of another length met once, and the audio is the eager
    decoder's."""
    import glm4voice.decoder.graphs as graphs_module
    from glm4voice.decoder.options import DecoderOptions

    eager = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", graph_batch_sizes=(1, 2))
    monkeypatch.setattr(graphs_module, "cuda_capture", StandInCapture())
    monkeypatch.setattr(DecoderOptions, "use_later_block_graphs", lambda self, device: True)
    graphed = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", graph_batch_sizes=(1, 2))
    graphed.warm_up((10, 20))
    warm = graphed.captured_graphs["later_vocoder"]
    assert sorted({shape[0] for shape in warm}) == [1, 2]
    assert sorted({shape[0] for shape in graphed.captured_graphs["later_encoder"]}) == [1, 2]
    codes = np.random.default_rng(4).integers(0, graphed.num_codes, 60).tolist()
    results = {}
    for name, decoder in (("graphed", graphed), ("eager", eager)):
        streams, pieces = two_streams_fed_together(decoder, codes, (10, 20, 20))
        if name == "graphed":
            assert graphed.captured_graphs["later_vocoder"] == warm  # the schedule's shapes were warmed up
        pieces[0].append(streams[0].feed(codes[50:60]))  # a 10-token later block: a new length, met once
        results[name] = [np.concatenate(p + [s.finish()]) for p, s in zip(pieces, streams)]
    for a, b in zip(results["graphed"], results["eager"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    assert graphed.captured_graphs["later_vocoder"] == warm  # a shape met once runs eagerly: no capture
