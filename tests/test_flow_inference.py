"""AudioDecoder on the tiny glm-4-voice-decoder folder: loading, offline vs streaming, seams, the bounded
prompt window, determinism and bad input."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch

from cosyvoice.flow.noise import NoiseTimeline, mix_seed
from flow_inference import HIFT_SEED_STREAM, AudioDecoder, DecoderError
from glm4voice.audio import MEL_HOP_LENGTH, OUTPUT_SAMPLE_RATE, SPEECH_TOKEN_RATE
from glm4voice.decoder.decoder import NotDecoded

SEAM_LIMIT = 3.0
"""Largest allowed seam score: prediction error at/after a seam over the signal's 99th percentile."""


@pytest.fixture(scope="module")
def decoder(tiny_checkpoints) -> AudioDecoder:
    return AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu")


@pytest.fixture(scope="module")
def plain_decoder(tiny_checkpoints) -> AudioDecoder:
    """The same decoder without the seam cross-fade (the original's seams)."""
    return AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", seam_crossfade=False)


@pytest.fixture(scope="module")
def codes(decoder) -> list[int]:
    return np.random.default_rng(0).integers(0, decoder.num_codes, 90).tolist()


def stream_blocks(decoder, codes, blocks, **options) -> tuple[np.ndarray, list[int]]:
    """Feed ``codes`` in blocks, then finish; returns the audio and the seam positions."""
    stream = decoder.stream(**options)
    pieces, start = [], 0
    for size in blocks:
        pieces.append(stream.feed(codes[start : start + size]))
        start += size
    assert start == len(codes)
    pieces.append(stream.finish())
    lengths = [len(p) for p in pieces if len(p)]
    return np.concatenate(pieces), list(np.cumsum(lengths)[:-1])


def seam_scores(x: np.ndarray, seams: list[int], order: int = 16, after: int = 300) -> np.ndarray:
    """How much each seam breaks the signal's own predictability: the largest linear-prediction error
    (order-16 predictor fitted on the whole signal) at the seam and in the ``after`` samples that follow
    (where the vocoder restarts), over the 99th percentile of that error across the signal."""
    past = np.stack([x[order - k - 1 : len(x) - k - 1] for k in range(order)], axis=1)
    target = x[order:]
    coefficients, *_ = np.linalg.lstsq(past, target, rcond=None)
    error = np.abs(target - past @ coefficients)
    scale = np.percentile(error, 99)
    return np.array([error[s - order : s - order + after].max() / scale for s in seams])


def test_loads_the_published_layout_strictly(decoder, tiny_checkpoints, tmp_path):
    assert decoder.num_codes == tiny_checkpoints.vocab.num_audio_codes and decoder.sample_rate == OUTPUT_SAMPLE_RATE
    assert not decoder.flow.training and not decoder.hift.training
    assert decoder.block_size == 10 and decoder.mel_overlap_len == 34 and decoder.source_cache_len == MEL_HOP_LENGTH
    folder = tiny_checkpoints.decoder
    # the original's constructor
    same = AudioDecoder(folder / "config.yaml", folder / "flow.pt", folder / "hift.pt", device="cpu")
    assert torch.equal(same.hift.conv_pre.weight, decoder.hift.conv_pre.weight)
    flow = torch.load(folder / "flow.pt", weights_only=True)
    hift = torch.load(folder / "hift.pt", weights_only=True)
    assert isinstance(flow, OrderedDict) and "conv_pre.weight_g" in hift and "conv_pre.weight" not in hift
    broken = {
        "missing": (OrderedDict((k, v) for k, v in flow.items() if k != "encoder.after_norm.bias"), "after_norm.bias"),
        "unexpected": (OrderedDict(flow, extra_weight=torch.zeros(1)), "extra_weight"),
        "shape": (OrderedDict(flow, **{"encoder_proj.bias": torch.zeros(3)}), "encoder_proj.bias"),
    }
    for name, (state, key) in broken.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        with pytest.raises(ValueError, match=key):
            AudioDecoder(folder / "config.yaml", path, folder / "hift.pt", device="cpu")
    with pytest.raises(FileNotFoundError):
        AudioDecoder(folder / "config.yaml", tmp_path / "none.pt", folder / "hift.pt", device="cpu")


def test_offline_and_streaming_have_the_same_length(decoder, codes):
    offline = decoder.decode(codes, seed=1)
    expected = decoder.mel_frames(len(codes)) * MEL_HOP_LENGTH
    assert offline.dtype == np.float32 and offline.shape == (expected,)
    for blocks in ([25, 50, 15], [13, 7, 70]):
        streamed, _ = stream_blocks(decoder, codes, blocks, seed=1)
        assert streamed.shape == (expected,), blocks
        assert np.isfinite(streamed).all() and np.abs(streamed).max() <= 0.99 + 1e-6
    # the original's entry points
    assert torch.equal(decoder.offline_inference(torch.tensor([codes]), seed=1)[0], torch.from_numpy(offline))
    assert decoder.stream_inference(torch.tensor([codes[:40]]), seed=1).shape == (
        1,
        decoder.mel_frames(40) * MEL_HOP_LENGTH,
    )


def _reference_stream(decoder: AudioDecoder, codes: list[int], blocks: list[int], seed: int) -> np.ndarray:
    """The original's streaming loop (web demo + token2wav, with PR #86's prompt bookkeeping) written out
    straightforwardly on the decoder's modules: every earlier token and final mel frame as prompt."""
    flow, hift = decoder.flow, decoder.hift
    generator = torch.Generator().manual_seed(mix_seed(seed, HIFT_SEED_STREAM))
    noise = NoiseTimeline(seed)
    window = torch.from_numpy(np.hamming(68))
    overlap = cache_mel = cache_source = None
    prompt, prompt_mel, out, start = [], torch.zeros(1, 80, 0), [], 0
    with torch.inference_mode():
        for index, size in enumerate(blocks):
            block, start = codes[start : start + size], start + size
            final = index == len(blocks) - 1
            frames = flow.mel_frames(len(prompt) + len(block))
            mel = flow.inference(
                torch.tensor([block]), None, torch.tensor([prompt], dtype=torch.long).reshape(1, -1), None,
                prompt_mel.transpose(1, 2), None, torch.zeros(1, 192), noise=noise.take(0, frames),
            )  # fmt: skip
            if overlap is not None:
                mel[:, :, :34] = mel[:, :, :34] * window[:34] + overlap * window[34:]
            vocoder_in = mel if cache_mel is None else torch.cat([cache_mel, mel], dim=2)
            if final:
                out.append(hift.inference(vocoder_in, cache_source, generator)[0])
                break
            overlap, vocoder_in = vocoder_in[:, :, -34:], vocoder_in[:, :, :-34]
            speech, source = hift.inference(vocoder_in, cache_source, generator)
            cache_mel, cache_source = vocoder_in[:, :, -1:], source[:, :, -256:]
            out.append(speech[:, :-256])
            prompt, prompt_mel = prompt + block, torch.cat([prompt_mel, mel[:, :, :-34]], dim=2)
    return torch.cat(out, dim=1)[0].numpy()


def test_unbounded_stream_is_the_original_algorithm(decoder, plain_decoder, codes):
    blocks = [10, 25, 20, 5]  # the last block stays pending until finish(), like the original's final call
    streamed, _ = stream_blocks(plain_decoder, codes[:60], blocks, seed=4, prompt_window=None)
    np.testing.assert_allclose(streamed, _reference_stream(decoder, codes[:60], blocks, seed=4), atol=2e-5)


def test_streaming_has_no_seams(decoder, plain_decoder, codes):
    blocks = [10, 20, 30, 30]
    streamed, seams = stream_blocks(decoder, codes, blocks, seed=3)
    scores = seam_scores(streamed, seams)
    assert len(seams) == 4 and scores.max() < SEAM_LIMIT, scores
    # the metric sees a discontinuity: independently decoded blocks, concatenated
    parts, start = [], 0
    for size in blocks:
        parts.append(decoder.decode(codes[start : start + size], seed=3))
        start += size
    naive_scores = seam_scores(np.concatenate(parts), list(np.cumsum([len(p) for p in parts])[:-1]))
    assert naive_scores.min() > SEAM_LIMIT, naive_scores
    # ... and in the original's scheme, whose vocoder restarts at each seam without left context
    original_scores = seam_scores(*stream_blocks(plain_decoder, codes, blocks, seed=3))
    assert original_scores.max() > SEAM_LIMIT, original_scores


def test_bounded_prompt_window(decoder, codes, monkeypatch):
    calls = []
    inference = decoder.flow.inference

    def recording(**kwargs):
        calls.append((kwargs["prompt_token"].shape[1], kwargs["token"].shape[1], kwargs["prompt_feat"].shape[1]))
        return inference(**kwargs)

    blocks = [10, 10, 20, 10, 20, 20]
    monkeypatch.setattr(decoder.flow, "inference", recording)
    bounded, seams = stream_blocks(decoder, codes, blocks, seed=5, prompt_window=20)
    prompts = [c[0] for c in calls]
    assert prompts == [0, 10, 20, 20, 20, 20] and max(prompts) < 20 + decoder.block_size
    assert all(prompt_mel > 0 for p, _, prompt_mel in calls if p)  # the window keeps its mel
    calls.clear()
    unbounded, _ = stream_blocks(decoder, codes, blocks, seed=5, prompt_window=None)
    assert [c[0] for c in calls] == [0, 10, 20, 40, 50, 70]
    assert bounded.shape == unbounded.shape
    # same seam quality as the unbounded stream (its own threshold)
    bounded_scores, unbounded_scores = seam_scores(bounded, seams), seam_scores(unbounded, seams)
    assert bounded_scores.max() < SEAM_LIMIT and unbounded_scores.max() < SEAM_LIMIT, (bounded_scores, unbounded_scores)
    # while the answer fits the window, bounded and unbounded are the same computation
    short_a, _ = stream_blocks(decoder, codes[:40], [10, 10, 20], seed=5, prompt_window=20)
    short_b, _ = stream_blocks(decoder, codes[:40], [10, 10, 20], seed=5, prompt_window=None)
    np.testing.assert_array_equal(short_a, short_b)


def test_deterministic_with_a_seed(decoder, codes):
    a, _ = stream_blocks(decoder, codes[:40], [10, 30], seed=11)
    b, _ = stream_blocks(decoder, codes[:40], [10, 30], seed=11)
    c, _ = stream_blocks(decoder, codes[:40], [10, 30], seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(decoder.decode(codes[:30], seed=2), decoder.decode(codes[:30], seed=2))
    stream = decoder.stream()
    assert isinstance(stream.seed, int) and stream.seed != decoder.stream().seed
    # the seed does not touch the global RNG
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    decoder.decode(codes[:12], seed=3)
    assert torch.equal(torch.rand(1), expected)


def test_small_blocks_and_the_tail(decoder, codes):
    one = decoder.decode(codes[:1], seed=0)
    assert one.shape == (decoder.mel_frames(1) * MEL_HOP_LENGTH,) == (6 * 256,)
    stream = decoder.stream(seed=0)
    assert stream.feed(codes[:1]).size == 0 and stream.pending_tokens == 1  # waits for a block
    assert stream.feed([]).size == 0
    assert stream.finish().shape == one.shape
    # a stream that ends on a block boundary still returns its held-back tail
    stream = decoder.stream(seed=0)
    first, second = stream.feed(codes[:10]), stream.feed(codes[10:20])
    tail = stream.finish()
    assert (
        first.size and second.size and tail.size == (decoder.mel_frames(20) * MEL_HOP_LENGTH - first.size - second.size)
    )
    assert tail.size >= decoder.mel_overlap_len * MEL_HOP_LENGTH
    assert decoder.stream(seed=0).finish().size == 0  # nothing fed, nothing to say


def test_bad_input_gets_clear_errors(decoder):
    with pytest.raises(DecoderError, match="no audio codes"):
        decoder.decode([])
    for bad, message in (
        (decoder.num_codes, "out of range"),
        (-1, "out of range"),
        (1.5, "integers"),
        (True, "integers"),
    ):
        with pytest.raises(DecoderError, match=message):
            decoder.decode([1, 2, bad])
    with pytest.raises(DecoderError, match="integers"):
        decoder.decode("123")
    with pytest.raises(DecoderError, match="one sequence"):
        decoder.decode(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(DecoderError, match="out of range"):
        decoder.stream().feed([0, 99999])
    stream = decoder.stream(seed=0)
    stream.finish()
    with pytest.raises(DecoderError, match="finished"):
        stream.feed([1] * 10)
    with pytest.raises(ValueError, match="prompt_window"):
        decoder.stream(prompt_window=5)
    with pytest.raises(ValueError, match="seed"):
        decoder.stream(seed=-1)
    with pytest.raises(TypeError, match="DecoderStream"):
        decoder.feed("not a stream", [1] * 10)


def test_streams_from_threads(decoder, codes):
    expected = {seed: stream_blocks(decoder, codes[:30], [10, 20], seed=seed)[0] for seed in (1, 2)}
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = stream_blocks(decoder, codes[:30], [10, 20], seed=seed)[0]
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for seed in (1, 2):
        np.testing.assert_array_equal(results[seed], expected[seed])


def test_one_stream_used_from_two_threads_is_refused(decoder, codes, monkeypatch):
    """While one thread decodes a stream's block, a second call on that stream fails at once with a
    clear RuntimeError (it does not wait, and does not disturb the first); the first call completes."""
    inside, leave = threading.Event(), threading.Event()
    vocode = decoder.hift.inference

    def held(*args, **kwargs):
        inside.set()
        assert leave.wait(120), "the test never let the first call finish"
        return vocode(*args, **kwargs)

    monkeypatch.setattr(decoder.hift, "inference", held)
    stream = decoder.stream(seed=0)
    first: list = []
    worker = threading.Thread(target=lambda: first.append(stream.feed(codes[:10])))
    worker.start()
    try:
        assert inside.wait(120)
        for call in (
            lambda: stream.feed(codes[10:20]),
            stream.finish,
            lambda: decoder.feed_many([(stream, codes[10:20])])[0],
        ):
            with pytest.raises(RuntimeError, match="two threads"):
                result = call()
                if isinstance(result, Exception):
                    raise result
    finally:
        leave.set()
        worker.join(120)
    monkeypatch.undo()
    assert len(first) == 1 and first[0].size and stream.pending_tokens == 0 and not stream.finished
    assert stream.feed(codes[10:20]).size  # free again once the first call returned
    # one stream twice in one feed_many call: the second job is refused, the first decoded
    twice = decoder.stream(seed=1)
    results = decoder.feed_many([(twice, codes[:10]), (twice, codes[10:20])])
    assert results[0].size and isinstance(results[1], RuntimeError)


def test_feed_many_batches_streams_without_changing_them(decoder, codes):
    """Blocks of several streams decoded together equal each stream decoded alone; a bad job fails alone."""
    blocks, seeds = [10, 20, 15, 30], (3, 4, 5)
    alone = {seed: stream_blocks(decoder, codes[:75], blocks, seed=seed, prompt_window=20)[0] for seed in seeds}
    streams = {seed: decoder.stream(seed=seed, prompt_window=20) for seed in seeds}
    pieces = {seed: [] for seed in seeds}
    before = decoder.stats.snapshot()
    start = 0
    for size in blocks:
        heard: list[int] = []
        jobs = [(streams[seed], codes[start : start + size]) for seed in seeds]
        results = decoder.feed_many(jobs, on_result=lambda index, _result, heard=heard: heard.append(index))
        assert sorted(heard) == [0, 1, 2] and not any(isinstance(r, Exception) for r in results)
        for seed, pcm in zip(seeds, results):
            pieces[seed].append(pcm)
        start += size
    # one batch of the three streams per call, no graph padding on the CPU
    figures = decoder.stats.since(before)
    assert figures["batches"] == len(blocks) and figures["mean_batch"] == len(seeds)
    assert figures["padded_row_share"] == 0 and figures["mean_block_tokens"] == round(sum(blocks) / len(blocks), 1)
    assert figures["busy_s"] > 0
    for seed in seeds:
        together = np.concatenate(pieces[seed] + [streams[seed].finish()])
        np.testing.assert_allclose(together, alone[seed], rtol=0, atol=1e-5)
    # one stream's bad codes or finished state is that job's error only; a short job waits for more codes
    good, finished, short = decoder.stream(seed=1), decoder.stream(seed=2), decoder.stream(seed=3)
    finished.finish()
    results = decoder.feed_many(
        [(good, codes[:10]), (finished, codes[:10]), (good_twin := decoder.stream(seed=1), [99999]), (short, codes[:3])]
    )
    assert results[0].size and results[3].size == 0 and short.pending_tokens == 3
    assert isinstance(results[1], DecoderError) and "finished" in str(results[1])
    assert isinstance(results[2], DecoderError) and "out of range" in str(results[2])
    np.testing.assert_array_equal(results[0], decoder.stream(seed=1).feed(codes[:10]))
    assert good_twin.pending_tokens == 0 and not good.state.busy


def test_flow_rows_of_different_lengths_equal_each_row_alone(decoder, codes):
    """prepare_rows and a masked solve: one padded batch of sequences of different lengths gives each its
    own mel."""
    flow = decoder.flow
    rows = [(0, 10), (20, 15), (40, 30)]  # (prompt tokens, new tokens)
    g = torch.Generator().manual_seed(0)
    tokens, prompts, lens, noises = [], [], [], []
    for prompt, new in rows:
        tokens.append(torch.tensor([codes[: prompt + new]]))
        frames = decoder.mel_frames(prompt + new)
        prompts.append(torch.randn(1, 80, decoder.mel_frames(prompt), generator=g))
        lens.append(frames)
        noises.append(torch.randn(1, 80, frames, generator=g))
    embedding = torch.randn(len(rows), 192, generator=g)
    with torch.no_grad():
        inputs = flow.prepare_rows(tokens, prompts, embedding, lens, noises)
        cfm = flow.decoder
        solved = cfm.solve(inputs.z, inputs.mu, inputs.mask, inputs.spks, inputs.cond, cfm.time_span(4), padded=True)
        together = [inputs.mel_of(row, solved[row : row + 1]) for row in range(len(rows))]
        for row, (prompt, new) in enumerate(rows):
            alone = flow.inference(
                token=tokens[row][:, prompt:], token_len=torch.tensor([new], dtype=torch.int32),
                prompt_token=tokens[row][:, :prompt], prompt_token_len=torch.tensor([prompt], dtype=torch.int32),
                prompt_feat=prompts[row].transpose(1, 2), prompt_feat_len=torch.tensor([prompts[row].shape[2]]),
                embedding=embedding[row : row + 1], feat_len=lens[row], n_timesteps=4, noise=noises[row],
            )  # fmt: skip
            assert together[row].shape == alone.shape == (1, 80, lens[row] - prompts[row].shape[2])
            torch.testing.assert_close(together[row], alone, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="one entry per row"):
        flow.prepare_rows(tokens, prompts[:2], embedding, lens, noises)


@pytest.mark.parametrize("mixed", [True, False])
def test_feed_many_mixes_blocks_of_different_lengths(tiny_checkpoints, codes, mixed):
    """Streams at different points of their answers: their later blocks (different lengths and prompts)
    share one flow batch, and each stream hears what it would alone; first blocks batch by shape."""
    decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", mixed_batches=mixed)
    schedules = {3: [10, 20, 15, 25], 4: [10, 25, 18, 20], 5: [10, 16, 20, 22]}  # later lengths within 1.5x
    alone = {
        seed: stream_blocks(decoder, codes[: sum(sizes)], sizes, seed=seed, prompt_window=20)[0]
        for seed, sizes in schedules.items()
    }
    streams = {seed: decoder.stream(seed=seed, prompt_window=20) for seed in schedules}
    pieces: dict[int, list[np.ndarray]] = {seed: [] for seed in schedules}
    starts = dict.fromkeys(schedules, 0)
    batches = []
    for step in range(4):
        jobs, seeds = [], []
        for seed, sizes in schedules.items():
            jobs.append((streams[seed], codes[starts[seed] : starts[seed] + sizes[step]]))
            seeds.append(seed)
            starts[seed] += sizes[step]
        before = decoder.stats.snapshot()
        results = decoder.feed_many(jobs)
        batches.append(decoder.stats.since(before)["batches"])
        for seed, pcm in zip(seeds, results):
            assert not isinstance(pcm, Exception), pcm
            pieces[seed].append(pcm)
    # first blocks (same shape): one batch; later blocks: one mixed batch, or one per shape
    assert batches == ([1, 1, 1, 1] if mixed else [1, 3, 3, 3])
    for seed in schedules:
        together = np.concatenate(pieces[seed] + [streams[seed].finish()])
        np.testing.assert_allclose(together, alone[seed], rtol=0, atol=1e-4)


def test_a_stopped_call_leaves_the_streams_of_its_later_batches_as_they_were(tiny_checkpoints, codes):
    """feed_many's ``stop``: asked between batches (one per shape here), true after the first one: the
    jobs of the other batches get NotDecoded and no ``on_result``; their streams are free and as before
    the call (the few codes fed before it, too few for a block, pending again, the job's own not). The
    same jobs given again, then on as usual: every stream hears what it would alone."""
    decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", mixed_batches=False)
    schedules = {3: [10, 20, 15], 4: [10, 25, 18], 5: [10, 16, 20]}  # the later blocks: three shapes
    early = {3: 4, 4: 0, 5: 3}  # codes of the second block fed before its job (fewer than a block)
    alone = {
        seed: stream_blocks(decoder, codes[: sum(sizes)], sizes, seed=seed, prompt_window=20)[0]
        for seed, sizes in schedules.items()
    }
    seeds = list(schedules)
    streams = {seed: decoder.stream(seed=seed, prompt_window=20) for seed in seeds}
    heard: dict[int, list[np.ndarray]] = {seed: [] for seed in seeds}
    for seed, pcm in zip(seeds, decoder.feed_many([(streams[seed], codes[:10]) for seed in seeds])):
        heard[seed].append(pcm)
    for seed in seeds:
        assert streams[seed].feed(codes[10 : 10 + early[seed]]).size == 0
    second = [(streams[seed], codes[10 + early[seed] : 10 + schedules[seed][1]]) for seed in seeds]
    asked, delivered = [], []
    results = decoder.feed_many(second, on_result=lambda index, _: delivered.append(index),
                                stop=lambda: asked.append(True) or True)  # fmt: skip
    left = [seed for seed, result in zip(seeds, results) if isinstance(result, NotDecoded)]
    done = [seed for seed in seeds if seed not in left]
    assert len(done) == 1 and len(left) == 2 and len(asked) == 1 and delivered == [seeds.index(done[0])]
    for seed in left:
        assert streams[seed].pending_tokens == early[seed] and not streams[seed].state.busy
    heard[done[0]].append(results[seeds.index(done[0])])
    for seed, pcm in zip(left, decoder.feed_many([second[seeds.index(seed)] for seed in left])):
        heard[seed].append(pcm)
    third = [(streams[seed], codes[sum(schedules[seed][:2]) : sum(schedules[seed])]) for seed in seeds]
    for seed, pcm in zip(seeds, decoder.feed_many(third, stop=lambda: False)):
        heard[seed].append(pcm)
    for seed, pieces in heard.items():
        assert not any(isinstance(p, Exception) for p in pieces), pieces
        together = np.concatenate(pieces + [streams[seed].finish()])
        np.testing.assert_allclose(together, alone[seed], rtol=0, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_first_blocks_decoded_at_pause_points_change_no_stream(tiny_checkpoints, codes, device):
    """feed_many's ``pause``: other streams' first blocks decoded in the middle of a batch of later
    blocks (between its ODE steps, before its vocoder) leave every stream's audio as it is alone; the
    time spent there is not the outer batch's."""
    decoder = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device=device)
    reference = decoder if device == "cpu" else AudioDecoder.from_pretrained(
        tiny_checkpoints.decoder, device=device, cuda_graphs=False
    )  # fmt: skip
    atol = 1e-5 if device == "cpu" else 5e-3
    sizes = {3: [10, 20, 30], 4: [10, 35, 15]}  # streams under way: their later blocks are paused
    newcomers = {5: [10, 20], 6: [15, 25]}  # streams that start meanwhile; 15 tokens: no first-block graph
    alone = {
        seed: stream_blocks(reference, codes[: sum(s)], s, seed=seed)[0] for seed, s in {**sizes, **newcomers}.items()
    }
    streams = {seed: decoder.stream(seed=seed) for seed in {**sizes, **newcomers}}
    heard: dict[int, list[np.ndarray]] = {seed: [] for seed in streams}
    to_start = list(newcomers)
    pauses = nested = 0
    slept = 0.0

    def pause() -> None:  # one newcomer's first block at each of the first pause points, then nothing
        nonlocal pauses, nested, slept
        pauses += 1
        if to_start:
            seed = to_start.pop(0)
            nested += 1
            (pcm,) = decoder.feed_many([(streams[seed], codes[: newcomers[seed][0]])])
            heard[seed].append(pcm)
            started = time.perf_counter()
            time.sleep(0.2)
            slept += time.perf_counter() - started

    starts = dict.fromkeys(sizes, 0)
    expected_pauses = 0
    for step in range(3):
        jobs = []
        for seed, s in sizes.items():
            jobs.append((streams[seed], codes[starts[seed] : starts[seed] + s[step]]))
            starts[seed] += s[step]
        before, wall = decoder.stats.snapshot(), time.perf_counter()
        results = decoder.feed_many(jobs, pause=pause if step else None)
        wall = time.perf_counter() - wall
        for seed, pcm in zip(sizes, results):
            assert not isinstance(pcm, Exception), pcm
            heard[seed].append(pcm)
        if step == 1:  # the pause's own time (the newcomers' blocks and the sleep) is not this call's
            assert decoder.stats.seconds - before.seconds <= wall - slept
        batches = decoder.stats.since(before)["batches"] - nested  # the newcomers' calls: one batch each
        nested = 0
        # first blocks: no pause; a batch of later blocks: after each of its ODE's steps but the last (9)
        # and before its vocoder; and one between two batches
        expected_pauses += 0 if step == 0 else 10 * batches + batches - 1
    assert pauses == expected_pauses >= 20 and not to_start
    for seed in newcomers:  # the rest of the newcomers' answers, plainly
        heard[seed].append(streams[seed].feed(codes[newcomers[seed][0] : sum(newcomers[seed])]))
    for seed, pieces in heard.items():
        together = np.concatenate(pieces + [streams[seed].finish()])
        np.testing.assert_allclose(together, alone[seed], rtol=0, atol=atol)


@pytest.mark.gpu
def test_cuda_graphs_match_eager_on_the_gpu(tiny_checkpoints, codes):
    """Every graphed path equals eager mode: whole first blocks (default), the ODE alone for them, every
    length padded to a bucket, the later blocks' vocoder; streamed, batched and offline."""
    eager = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cuda", cuda_graphs=False)
    graphs = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cuda")
    ode_only = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cuda", graph_first_blocks=False)
    padded = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cuda", graph_first_blocks=False)
    padded.solver.exact_frames = 0  # every length padded to a bucket
    later = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cuda", graph_later_blocks=True)
    assert eager.captured_graphs == {
        "ode": [], "first_block_flow": [], "first_block_vocoder": [], "later_encoder": [], "later_vocoder": [],
    }  # fmt: skip
    reference, _ = stream_blocks(eager, codes, [10, 25, 55], seed=1)
    for decoder in (graphs, ode_only, padded, later):
        for _ in range(2):  # capture, then replay
            streamed, _ = stream_blocks(decoder, codes, [10, 25, 55], seed=1)
            np.testing.assert_allclose(streamed, reference, atol=5e-3)  # TF32 convolutions, other kernels
    assert graphs.captured_graphs["first_block_flow"] and graphs.captured_graphs["first_block_vocoder"]
    assert graphs.captured_graphs["ode"] and all(padded for *_, padded in graphs.captured_graphs["ode"])
    assert not ode_only.captured_graphs["first_block_flow"] and (1, 68, 11, False) in ode_only.captured_graphs["ode"]
    assert all(padded for *_, padded in padded.captured_graphs["ode"])
    # the vocoder of the 25- and 55-token blocks and of the flush of the held-back frames, and the encoder
    # of the two later blocks: captured at their second use (the second stream above, whose audio then
    # came from the graphs)
    assert not graphs.captured_graphs["later_vocoder"] and len(later.captured_graphs["later_vocoder"]) == 3
    assert later.captured_graphs["later_encoder"]
    np.testing.assert_allclose(graphs.decode(codes, seed=2), eager.decode(codes, seed=2), atol=5e-3)
    np.testing.assert_allclose(
        graphs.decode(codes[:8], seed=2), eager.decode(codes[:8], seed=2), atol=5e-3
    )  # a graphed final first block
    # first blocks of three streams in one batch (the graph of 4 rows) equal each stream alone, eagerly
    streams = [graphs.stream(seed=s) for s in (3, 4, 5)]
    batched = graphs.feed_many([(stream, codes[:10]) for stream in streams])
    for seed, pcm in zip((3, 4, 5), batched):
        np.testing.assert_allclose(pcm, eager.stream(seed=seed).feed(codes[:10]), atol=5e-3)
    assert any(shape[0] == 4 for shape in graphs.captured_graphs["first_block_flow"])
    # later blocks of different lengths in one mixed batch (one masked ODE graph) equal each stream alone
    mixed = {3: [10, 20, 30], 4: [10, 35, 15]}
    streams = [graphs.stream(seed=s) for s in mixed]
    starts, heard = [0, 0], {seed: [] for seed in mixed}
    for step in range(3):
        jobs = []
        for i, sizes in enumerate(mixed.values()):
            jobs.append((streams[i], codes[starts[i] : starts[i] + sizes[step]]))
            starts[i] += sizes[step]
        for seed, pcm in zip(mixed, graphs.feed_many(jobs)):
            heard[seed].append(pcm)
    for seed, sizes in mixed.items():
        reference, _ = stream_blocks(eager, codes[: sum(sizes)], sizes, seed=seed)
        together = np.concatenate(heard[seed] + [streams[list(mixed).index(seed)].finish()])
        np.testing.assert_allclose(together, reference, atol=5e-3)


@pytest.mark.gpu
def test_compiled_first_block_graphs_match_eager_on_the_gpu(tiny_checkpoints, codes):
    """torch.compile'd estimator and vocoder inside the first-block graphs (compiles: a minute or two)."""
    eager = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cuda", cuda_graphs=False)
    compiled = AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cuda", compile_first_blocks=True)
    blocks = [10, 25, len(codes) - 35]  # a first block, then the rest
    reference, _ = stream_blocks(eager, codes, blocks, seed=1)
    for _ in range(2):
        streamed, _ = stream_blocks(compiled, codes, blocks, seed=1)
        np.testing.assert_allclose(streamed, reference, atol=5e-3)
    assert compiled.captured_graphs["first_block_flow"] and compiled.captured_graphs["first_block_vocoder"]


@pytest.mark.gpu
def test_warm_up_captures_every_graph_a_schedule_needs(tiny_checkpoints, codes):
    """After warm_up, streams with any block sizes the schedule and early flushes make, alone or
    batched in whole solves, replay graphs only (no capture while a listener waits); for blocks that
    join between steps: tests/glm4voice/decoder/test_steps.py."""
    decoder = AudioDecoder.from_pretrained(
        tiny_checkpoints.decoder, device="cuda", prompt_window=30, graph_batch_sizes=(1, 2, 4)
    )
    decoder.warm_up((10, 20, 40))  # every graphed batch size
    shapes = decoder.captured_graphs
    off = {"later_encoder", "later_vocoder"}  # later-block graphs are off
    assert all(shapes[name] for name in shapes.keys() - off) and not any(shapes[name] for name in off)
    assert {shape[0] for shape in shapes["first_block_flow"]} == {1, 2, 4}
    for sizes in ([10, 20, 40, 40, 40], [10, 16, 26, 13, 40, 11, 40]):
        for count in (1, 3):
            streams = [decoder.stream(seed=s) for s in range(count)]
            start = 0
            for size in sizes:
                for result in decoder.feed_many([(s, codes[start : start + size]) for s in streams]):
                    assert not isinstance(result, Exception), result
                start += size
    assert decoder.captured_graphs == shapes


def test_published_timing_facts_match_what_a_stream_does(decoder, codes):
    """``hold_back_s`` and ``min_block_tokens`` (read by the pipeline's pacing) describe the stream."""
    assert decoder.min_block_tokens == decoder.block_size == 10
    stream = decoder.stream(seed=0)
    assert stream.feed(codes[: decoder.min_block_tokens - 1]).size == 0
    emitted = stream.feed(codes[decoder.min_block_tokens - 1 : 40]).size
    fed_s = 40 / SPEECH_TOKEN_RATE
    held_s = fed_s - emitted / decoder.sample_rate
    # what is held back: the hold-back, plus less than one frame lost to the flow's rounding down
    assert decoder.hold_back_s <= held_s < decoder.hold_back_s + MEL_HOP_LENGTH / decoder.sample_rate
    assert decoder.hold_back_s == pytest.approx((34 + 1) * 256 / 22050)
    assert stream.finish().size / decoder.sample_rate == pytest.approx(held_s, abs=MEL_HOP_LENGTH / decoder.sample_rate)
    for name in ("hold_back_s", "min_block_tokens", "max_batch", "graph_batch_sizes", "sample_rate", "device"):
        with pytest.raises(AttributeError):
            setattr(decoder, name, getattr(decoder, name))
