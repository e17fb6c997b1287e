"""The original's block API, ``AudioDecoder.token2wav(tts_token, uuid=..., prompt_token=..., prompt_feat=...,
finalize=...)``, driven exactly as the original web demo drives it: shapes, per-uuid state released at
finalize, independent interleaved answers, and the documented relationship to our own streaming decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosyvoice.flow.flow_matching import original_noise
from cosyvoice.flow.noise import OriginalNoise, mix_seed
from flow_inference import HIFT_SEED_STREAM, AudioDecoder, DecoderError
from glm4voice.audio import MEL_HOP_LENGTH, NUM_MEL_BINS
from glm4voice.decoder.original import DEFAULT_TOKEN2WAV_SEED, UuidStates
from glm4voice.decoder.state import StreamState

CUTS = [25, 50, 100, 7]
"""The original web demo's blocks (25, 50, 100, ...), the answer ending after 7 more tokens: its last
call has ``finalize=True`` (7 < 10 tokens, so our stream also decodes them as its final block)."""
SHORT = [10, 20, 30, 7]
"""Smaller cuts of the same kind, for the tests that decode many answers (the unbounded prompt makes
every block re-decode the whole answer so far)."""
OVERLAP = 34


@pytest.fixture(scope="module")
def decoder(tiny_checkpoints) -> AudioDecoder:
    return AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu")


@pytest.fixture(scope="module")
def plain_decoder(tiny_checkpoints) -> AudioDecoder:
    """Without the seam cross-fade: the original's audio."""
    return AudioDecoder.from_pretrained(tiny_checkpoints.decoder, device="cpu", seam_crossfade=False)


@pytest.fixture(scope="module")
def codes(decoder) -> list[int]:
    return np.random.default_rng(7).integers(0, decoder.num_codes, sum(CUTS)).tolist()


@pytest.fixture(scope="module")
def original_calls(plain_decoder, codes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The original web demo's calls on the cuts, without the seam cross-fade (the original's audio)."""
    return web_demo(plain_decoder, codes, CUTS, uuid="original")


@pytest.fixture(scope="module")
def ours_plain(plain_decoder, codes) -> list[np.ndarray]:
    return our_stream(plain_decoder, codes, CUTS)


def web_demo(decoder, codes, cuts, uuid, pr86: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The original web demo's decode loop: every earlier token as ``prompt_token`` and the concatenated
    returned mels as ``prompt_feat``; ``pr86``: drop the carried frame that each returned mel but the
    first starts with (the fix of the original's unmerged PR #86). Returns each call's (speech, mel)."""
    flow_prompt_speech_token = torch.zeros(1, 0, dtype=torch.int64)
    prompt_speech_feat = torch.zeros(1, 0, NUM_MEL_BINS)
    tts_mels, out, start = [], [], 0
    for index, size in enumerate(cuts):
        tts_token = torch.tensor(codes[start : start + size]).unsqueeze(0)
        start += size
        if tts_mels:
            prompt_speech_feat = torch.cat(tts_mels, dim=-1).transpose(1, 2)
        tts_speech, tts_mel = decoder.token2wav(
            tts_token, uuid=uuid, prompt_token=flow_prompt_speech_token, prompt_feat=prompt_speech_feat,
            finalize=index == len(cuts) - 1,
        )  # fmt: skip
        out.append((tts_speech, tts_mel))
        tts_mels.append(tts_mel[:, :, 1:] if pr86 and index else tts_mel)
        flow_prompt_speech_token = torch.cat((flow_prompt_speech_token, tts_token), dim=-1)
    return out


def our_stream(decoder, codes, cuts, seed=DEFAULT_TOKEN2WAV_SEED) -> list[np.ndarray]:
    """Our streaming decode of the same cuts: unbounded prompt, the original's noise, same vocoder seed."""
    stream = decoder.stream(seed=seed, prompt_window=None, noise=OriginalNoise())
    pieces, start = [], 0
    for size in cuts[:-1]:
        pieces.append(stream.feed(codes[start : start + size]))
        start += size
    assert stream.feed(codes[start : start + cuts[-1]]).size == 0  # the last cut waits for finish(), like finalize=True
    pieces.append(stream.finish())
    return pieces


def original_algorithm(decoder, codes, cuts) -> list[np.ndarray]:
    """The original's token2wav and web demo written out straightforwardly on the decoder's modules
    (per-uuid overlap and vocoder cache; the returned mel includes the carried frame; the caller appends
    it to its prompt mel), with our vocoder generator in place of the global RNG."""
    flow, hift = decoder.flow, decoder.hift
    generator = torch.Generator().manual_seed(mix_seed(DEFAULT_TOKEN2WAV_SEED, HIFT_SEED_STREAM))
    window = torch.from_numpy(np.hamming(2 * OVERLAP))
    overlap = cache_mel = cache_source = None
    prompt, mels, out, start = [], [], [], 0
    with torch.inference_mode():
        for index, size in enumerate(cuts):
            block, start = codes[start : start + size], start + size
            prompt_feat = torch.cat(mels, dim=2) if mels else torch.zeros(1, NUM_MEL_BINS, 0)
            frames = flow.mel_frames(len(prompt) + len(block))
            mel = flow.inference(
                torch.tensor([block]), None, torch.tensor([prompt], dtype=torch.long).reshape(1, -1), None,
                prompt_feat.transpose(1, 2), None, torch.zeros(1, 192), noise=original_noise((1, NUM_MEL_BINS, frames)),
            )  # fmt: skip
            if overlap is not None:
                mel[:, :, :OVERLAP] = mel[:, :, :OVERLAP] * window[:OVERLAP] + overlap * window[OVERLAP:]
            if cache_mel is not None:
                mel = torch.cat([cache_mel, mel], dim=2)
            if index == len(cuts) - 1:
                out.append(hift.inference(mel, cache_source, generator)[0][0].numpy())
                break
            overlap, mel = mel[:, :, -OVERLAP:], mel[:, :, :-OVERLAP]
            speech, source = hift.inference(mel, cache_source, generator)
            cache_mel, cache_source = mel[:, :, -1:], source[:, :, -MEL_HOP_LENGTH:]
            out.append(speech[0, :-MEL_HOP_LENGTH].numpy())
            prompt, mels = prompt + block, mels + [mel]
    return out


def test_shapes_and_lengths_are_the_originals(decoder, original_calls):
    calls = original_calls
    prompt_frames, total = 0, 0
    for index, (speech, mel) in enumerate(calls):
        total += CUTS[index]
        final, carried = index == len(CUTS) - 1, 1 if index else 0
        new = decoder.mel_frames(total) - prompt_frames  # the flow's new frames after the caller's prompt mel
        frames = carried + new - (0 if final else OVERLAP)
        assert speech.dtype == mel.dtype == torch.float32
        assert mel.shape == (1, NUM_MEL_BINS, frames), index
        assert speech.shape == (1, frames * MEL_HOP_LENGTH - (0 if final else MEL_HOP_LENGTH)), index
        prompt_frames += frames
    assert [m.shape[2] for _, m in calls] == [decoder.mel_frames(25) - OVERLAP, 1 + 516 - 138 - OVERLAP, 1 + 1205 - 483 - OVERLAP, 1 + decoder.mel_frames(182) - 1172]  # fmt: skip
    assert decoder.token2wav_open == 0


def test_with_pr86_bookkeeping_every_block_equals_our_stream(decoder, plain_decoder, codes, ours_plain):
    """A caller that drops the carried frame from each returned mel but the first gets, block by block,
    exactly our streaming decode of the same cuts (unbounded prompt, same noise and vocoder seed), with
    the seam cross-fade off (the original's audio) and on (the decoder's default)."""
    for d, cuts, ours in ((plain_decoder, CUTS, ours_plain), (decoder, SHORT, None)):
        ours = ours if ours is not None else our_stream(d, codes, cuts)
        theirs = [speech[0].numpy() for speech, _ in web_demo(d, codes, cuts, uuid="pr86", pr86=True)]
        assert len(theirs) == len(ours) == len(cuts)
        for a, b in zip(theirs, ours):
            np.testing.assert_array_equal(a, b)


def test_driven_like_the_original_it_computes_the_original_algorithm(plain_decoder, codes, original_calls, ours_plain):
    """Driven as the original web demo drives it, the prompt mel from the 3rd block on holds one frame
    twice (the carried frame the 2nd block's mel starts with), so each of those blocks' mel starts
    one frame later: blocks 1 and 2 equal our stream's, every later block is 256 samples shorter
    (one frame at its seam is never vocoded), and the audio is what the original computes."""
    theirs = [speech[0].numpy() for speech, _ in original_calls]
    ours = ours_plain
    for a, b in zip(theirs[:2], ours[:2]):
        np.testing.assert_array_equal(a, b)
    assert [len(b) - len(a) for a, b in zip(theirs, ours)] == [0, 0, MEL_HOP_LENGTH, MEL_HOP_LENGTH]
    assert sum(map(len, theirs)) == sum(map(len, ours)) - MEL_HOP_LENGTH * (len(CUTS) - 2)
    assert not np.array_equal(theirs[2], ours[2][: len(theirs[2])])
    reference = original_algorithm(plain_decoder, codes, CUTS)
    for a, b in zip(theirs, reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_state_lives_until_finalize_and_uuids_are_independent(decoder, codes):
    """One uuid's state exists between its first call and finalize; many answers leave nothing behind;
    answers interleaved call by call equal the same answers decoded one after the other."""
    short = [12, 5]
    alone = {uuid: web_demo(decoder, codes[i:], short, uuid=uuid) for i, uuid in enumerate(("a", "b"))}
    assert decoder.token2wav_open == 0
    # interleaved: a1, b1, a2, b2 (b with a tuple uuid: any hashable works)
    keys, starts = {"a": "a", "b": ("answer", 2)}, {"a": 0, "b": 1}
    got = {name: [] for name in keys}
    prompts = {name: (torch.zeros(1, 0, dtype=torch.long), []) for name in keys}
    for index, size in enumerate(short):
        for name, uuid in keys.items():
            offset = starts[name] + sum(short[:index])
            token = torch.tensor([codes[offset : offset + size]])
            tokens, mels = prompts[name]
            feat = torch.cat(mels, dim=-1).transpose(1, 2) if mels else None
            speech, mel = decoder.token2wav(token, uuid, prompt_token=tokens, prompt_feat=feat, finalize=index == 1)
            got[name].append(speech)
            prompts[name] = (torch.cat([tokens, token], dim=1), mels + [mel])
        assert decoder.token2wav_open == (2 if index == 0 else 0)
    for name in keys:
        for a, (b, _) in zip(got[name], alone[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # many answers: no state left; one answer that never finalizes is kept until released
    for k in range(20):
        web_demo(decoder, codes[k:], [10, 3], uuid=f"many-{k}")
    assert decoder.token2wav_open == 0
    decoder.token2wav(torch.tensor([codes[:10]]), "abandoned")
    assert decoder.token2wav_open == 1
    decoder.release("abandoned")
    assert decoder.token2wav_open == 0


def test_a_state_object_stands_in_for_the_uuid(decoder, codes):
    """``token2wav`` with a StreamState from ``new_state`` (beside the streaming API): the state keeps
    the carry; with PR #86 bookkeeping it equals the stream of the same seed and noise."""
    state = decoder.new_state(seed=5, prompt_window=None)
    assert isinstance(state, StreamState)
    speech = [s[0].numpy() for s, _ in web_demo(decoder, codes, SHORT, uuid=state, pr86=True)]
    assert state.carry.mel_overlap is None and decoder.token2wav_open == 0
    stream = decoder.stream(seed=5, prompt_window=None)
    ours, start = [], 0
    for size in SHORT[:-1]:
        ours.append(stream.feed(codes[start : start + size]))
        start += size
    stream.feed(codes[start : start + SHORT[-1]])
    ours.append(stream.finish())
    for a, b in zip(speech, ours):
        np.testing.assert_array_equal(a, b)


def test_bad_calls_get_clear_errors_and_leave_no_state(decoder, codes):
    token = torch.tensor([codes[:10]])
    bad = [
        ({"token": torch.tensor(codes[:10])}, "shape \\(1, n\\)"),
        ({"token": torch.zeros(1, 0, dtype=torch.long)}, "at least one token"),
        ({"token": torch.tensor([[1, decoder.num_codes]])}, "out of range"),
        ({"token": torch.tensor([[0.5, 1.0]])}, "integers"),
        ({"prompt_token": torch.tensor([[-1]])}, "out of range"),
        ({"prompt_feat": torch.zeros(1, 80, 5)}, "prompt_feat"),
        ({"prompt_feat": torch.zeros(1, 500, 80)}, "more than"),
        ({"embedding": torch.zeros(192)}, "embedding"),
        ({"noise": torch.zeros(1, 80, 3)}, "noise"),
    ]
    for change, message in bad:
        call = {"token": token, "uuid": "bad", "prompt_token": None, "prompt_feat": None} | change
        with pytest.raises(DecoderError, match=message):
            decoder.token2wav(**call)
    with pytest.raises(TypeError, match="hashable"):
        decoder.token2wav(token, uuid=["not", "hashable"])
    assert decoder.token2wav_open == 0
    # a block too short to stream (no more than the 34-frame overlap) is refused; the answer goes on
    with pytest.raises(DecoderError, match="more than 34 mel frames"):
        decoder.token2wav(torch.tensor([codes[:4]]), "short")
    speech, _mel = decoder.token2wav(torch.tensor([codes[:4]]), "short", finalize=True)
    assert speech.shape == (1, decoder.mel_frames(4) * MEL_HOP_LENGTH) and decoder.token2wav_open == 0
    # the original's other entry point
    np.testing.assert_array_equal(
        decoder.offline_inference(token, seed=3)[0].numpy(), decoder.decode(codes[:10], seed=3)
    )


def test_uuid_table_is_bounded():
    """Answers that never finalize cannot grow the table without bound: the least recently used goes."""
    table = UuidStates(capacity=3)
    made = []

    def create():
        made.append(StreamState(0, None, OriginalNoise(), carry=None, mel=torch.zeros(1, 80, 0)))  # type: ignore[arg-type]
        return made[-1]

    for uuid in "abc":
        table.open(uuid, create)
    assert table.open("a", create) is made[0]  # "a" is now the most recently used
    table.open("d", create)
    assert len(table) == 3 and "b" not in table and all(u in table for u in "acd")
    made[2].busy = True  # "c" (least recently used now) is in use: kept, the table grows for a moment
    table.open("e", create)
    assert "c" in table and len(table) == 4
    table.discard("e", made[0])  # another uuid's state: nothing happens
    assert "e" in table
    with pytest.raises(ValueError):
        UuidStates(capacity=0)
