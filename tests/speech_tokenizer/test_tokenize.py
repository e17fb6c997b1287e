import math

import numpy as np
import pytest
import soundfile as sf
import torch

from glm4voice.audio import (
    AudioError,
    AudioTooLongError,
    CorruptAudioError,
    EmptyAudioError,
    NonFiniteAudioError,
    encode_wav,
)
from speech_tokenizer import SpeechTokenizer, TokenizerOptions, WhisperVQEncoder, extract_speech_token
from speech_tokenizer.pipeline import FeatureExtractorMismatch

RATE = 16000


def test_four_seconds_give_fifty_tokens(tokenizer, speechlike):
    codes = tokenizer.tokenize((speechlike(4.0), RATE))
    assert len(codes) == 50
    assert all(isinstance(c, int) and 0 <= c < tokenizer.num_codes for c in codes)
    assert len(set(codes)) > 5


@pytest.mark.parametrize("samples", [1, 799, 1279, 1280, 1281, 2560, 12345])
def test_token_count_is_ceil_of_duration_times_rate(tokenizer, speechlike, samples):
    wave = speechlike(1.0)[:samples]
    assert len(tokenizer.tokenize((wave, RATE))) == math.ceil(samples / 1280)


def test_batched_equals_one_by_one_and_padding_never_leaks(tokenizer, speechlike):
    lengths = [4.0, 0.3, 2.71, 7.9, 1280 * 31 / RATE, (1280 * 12 - 3) / RATE, 31.0]
    waves = [speechlike(s, f0=120 + 15 * i, seed=i) for i, s in enumerate(lengths)]
    singles = [tokenizer.tokenize((w, RATE)) for w in waves]
    assert [len(c) for c in singles] == [math.ceil(len(w) / 1280) for w in waves]
    in_threes = SpeechTokenizer(tokenizer.model, tokenizer.feature_extractor, TokenizerOptions(batch_size=3))
    assert in_threes.tokenize_batch([(w, RATE) for w in waves]) == singles
    tensors = [(torch.from_numpy(w)[None], RATE) for w in waves]
    assert extract_speech_token(tokenizer.model, tokenizer.feature_extractor, tensors, batch_size=16) == singles


def test_thirty_second_cut_over(tokenizer, speechlike):
    wave = speechlike(45.0, f0=130)
    first, rest = wave[: 30 * RATE], wave[30 * RATE :]
    codes = tokenizer.tokenize((wave, RATE))
    assert len(codes) == 375 + 188
    assert codes[:375] == tokenizer.tokenize((first, RATE))  # positions restart at every piece
    assert codes[375:] == tokenizer.tokenize((rest, RATE))
    just_over = tokenizer.tokenize((wave[: 30 * RATE + 1], RATE))
    assert len(just_over) == 376 and just_over[:375] == codes[:375]


def test_last_piece_is_featurized_as_the_original_batch_does(tokenizer, feature_extractor, speechlike):
    """A last piece of exactly k*1280 samples: the original pads it to 30 s with the other piece,
    so its last STFT frame sees zeros, not a reflection. Our codes follow that."""
    wave = speechlike(30.0 + 1280 * 100 / RATE, f0=170)
    rest = wave[30 * RATE :]
    codes = tokenizer.tokenize((wave, RATE))
    padded = feature_extractor(
        [rest],
        sampling_rate=RATE,
        padding="max_length",
        max_length=30 * RATE,
        return_attention_mask=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = tokenizer.model(padded["input_features"], padded["attention_mask"])
    assert codes[375:] == out.quantized_token_ids[0][out.token_mask[0]].tolist()


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_sample_rates_are_resampled(tokenizer, speechlike, rate):
    reference = tokenizer.tokenize((speechlike(3.0, noise=0.0), RATE))
    codes = tokenizer.tokenize((speechlike(3.0, rate, noise=0.0), rate))
    assert len(codes) == len(reference) == 38
    agreement = np.mean(np.array(codes) == np.array(reference))
    assert agreement > 0.8, agreement  # the same sound; a resampler's small errors move a few codes


def test_stereo_typed_api_averages_compatible_api_takes_channel_0(tokenizer, speechlike, tmp_path):
    left, right = speechlike(2.0, f0=140, seed=1), speechlike(2.0, f0=260, seed=2)
    stereo = np.stack([left, right], axis=1)  # (samples, channels)
    mono_mix = (left + right) / 2
    assert tokenizer.tokenize((stereo, RATE)) == tokenizer.tokenize((mono_mix, RATE))
    assert tokenizer.tokenize((stereo, RATE)) != tokenizer.tokenize((left, RATE))
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, RATE, subtype="FLOAT")
    model, fe = tokenizer.model, tokenizer.feature_extractor
    first = extract_speech_token(model, fe, [(torch.from_numpy(left)[None], RATE)])[0]
    assert extract_speech_token(model, fe, [str(path)])[0] == first
    assert extract_speech_token(model, fe, [(torch.from_numpy(stereo.T.copy()), RATE)])[0] == first
    assert tokenizer.tokenize(str(path)) == tokenizer.tokenize((mono_mix, RATE))


def test_accepts_paths_bytes_arrays_tensors_and_audio(tokenizer, speechlike, tmp_path):
    from glm4voice.audio import Audio

    wave = speechlike(1.5)
    expected = tokenizer.tokenize((wave, RATE))
    data = encode_wav(wave, RATE, subtype="FLOAT")
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    assert tokenizer.tokenize(data) == expected
    assert tokenizer.tokenize(path) == expected
    assert tokenizer.tokenize(wave, source_rate=RATE) == expected
    assert tokenizer.tokenize(torch.from_numpy(wave), source_rate=RATE) == expected
    assert tokenizer.tokenize(Audio(wave, RATE)) == expected
    assert tokenizer.tokenize_batch([data, path]) == [expected, expected]


def _causal_variant(tokenizer, **changes):
    model = WhisperVQEncoder(tokenizer.model.config.replace(**changes)).eval()
    model.load_state_dict(tokenizer.model.state_dict())
    return SpeechTokenizer(model, tokenizer.feature_extractor)


def _stable_prefix_check(tok, prefix, extra, stable: int):
    """Appending quieter audio (so that the log-mel clamp, relative to the loudest frame, stays
    put) must not change the first ``stable`` tokens or their quantiser inputs."""
    before = tok.tokenize((prefix, RATE))
    after = tok.tokenize((np.concatenate([prefix, extra]), RATE))
    assert len(after) > len(before) >= stable > 0
    assert after[:stable] == before[:stable]
    return before, after


def test_block_causal_published_settings_never_change_tokens_of_finished_blocks(tokenizer, speechlike):
    """Published settings: causal convolutions + block-causal attention in blocks of 200 frames
    (= 50 tokens, 4 s). Tokens of blocks that the prefix completes never change."""
    config = tokenizer.model.config
    assert config.encoder_causal_convolution and config.quantize_causal_block_size == 200
    prefix = speechlike(9.0, f0=150)
    for seconds, seed in ((0.5, 3), (3.0, 4), (12.0, 5)):
        extra = speechlike(seconds, f0=210, seed=seed, level=0.05)
        before, after = _stable_prefix_check(tokenizer, prefix, extra, stable=100)
    assert before[100:] != after[100 : len(before)]  # the open block does look ahead (not a vacuous test)


def test_fully_causal_settings_never_change_earlier_tokens(tokenizer, speechlike):
    """encoder_causal_attention: every token whose STFT windows end before the prefix's end stays."""
    causal = _causal_variant(tokenizer, encoder_causal_attention=True)
    for samples in (1280 * 37, 1280 * 37 + 500, 1280 * 37 + 1250):
        prefix = speechlike(samples / RATE, f0=150)
        # token k's last STFT window ends 40 samples after the token: 1280 (k + 1) + 40 <= samples
        stable = (samples - 40) // 1280
        extra = speechlike(2.0, f0=230, seed=7, level=0.05)
        _stable_prefix_check(causal, prefix, extra, stable=stable)


def test_silence_and_tiny_clips_give_tokens(tokenizer, speechlike):
    assert len(tokenizer.tokenize((np.zeros(2 * RATE, np.float32), RATE))) == 25
    assert len(tokenizer.tokenize((speechlike(0.05), RATE))) == 1
    assert len(tokenizer.tokenize((np.zeros(1, np.float32), RATE))) == 1


@pytest.mark.parametrize(
    "audio, error",
    [
        ((np.zeros(0, np.float32), RATE), EmptyAudioError),
        (b"", EmptyAudioError),
        (b"RIFF not really a wav file", CorruptAudioError),
        ((np.array([0.1, np.nan, 0.2], np.float32), RATE), NonFiniteAudioError),
        ((np.full(100, np.inf, np.float32), RATE), NonFiniteAudioError),
        ((np.zeros((2, 2, 2), np.float32), RATE), AudioError),
        ((np.zeros(100, np.float32), 0), AudioError),
        (np.zeros(100, np.float32), AudioError),  # an array without its rate
        (12345, AudioError),
    ],
)
def test_bad_input_is_a_clear_error(tokenizer, audio, error):
    with pytest.raises(error):
        tokenizer.tokenize(audio)


def test_compatible_api_rejects_bad_input_clearly(tokenizer, tmp_path):
    model, fe = tokenizer.model, tokenizer.feature_extractor
    with pytest.raises(EmptyAudioError):
        extract_speech_token(model, fe, [(torch.zeros(1, 0), RATE)])
    with pytest.raises(NonFiniteAudioError):
        extract_speech_token(model, fe, [(torch.full((1, 10), float("nan")), RATE)])
    # (samples, channels) is read as such: its first channel is the same as the channels-first form's
    stereo = torch.stack([torch.linspace(-0.5, 0.5, 4000), torch.zeros(4000)])
    assert extract_speech_token(model, fe, [(stereo.T, RATE)]) == extract_speech_token(model, fe, [(stereo, RATE)])
    assert extract_speech_token(model, fe, [(stereo, RATE)]) == extract_speech_token(model, fe, [(stereo[0], RATE)])
    with pytest.raises(AudioError):
        extract_speech_token(model, fe, [(torch.zeros(2, 2, 10), RATE)])
    with pytest.raises(AudioError, match="no audio file"):
        extract_speech_token(model, fe, [str(tmp_path / "missing.wav")])
    (tmp_path / "bad.wav").write_bytes(b"garbage")
    with pytest.raises(CorruptAudioError):
        extract_speech_token(model, fe, [str(tmp_path / "bad.wav")])
    with pytest.raises(TypeError):
        extract_speech_token(model, fe, "one.wav")
    with pytest.raises(TypeError, match="not one utterance"):
        extract_speech_token(model, fe, (torch.zeros(1, 100), RATE))
    assert extract_speech_token(model, fe, []) == []


def test_ten_minutes_in_bounded_batches_and_the_limit(tokenizer, speechlike):
    minute = speechlike(60.0, f0=140)
    ten_minutes = np.tile(minute, 10)
    small_batches = SpeechTokenizer(tokenizer.model, tokenizer.feature_extractor, TokenizerOptions(batch_size=4))
    codes = small_batches.tokenize((ten_minutes, RATE))
    assert len(codes) == 7500
    assert codes[:750] == codes[750:1500]  # the same minute twice gives the same codes (pieces are 30 s)
    with pytest.raises(AudioTooLongError, match="limit is 600 s"):
        tokenizer.tokenize((np.concatenate([ten_minutes, minute[:RATE]]), RATE))


def test_batch_api_misuse(tokenizer):
    with pytest.raises(TypeError):
        tokenizer.tokenize_batch("a.wav")
    with pytest.raises(ValueError, match="batch_size"):
        SpeechTokenizer(tokenizer.model, tokenizer.feature_extractor, TokenizerOptions(batch_size=0))
    assert tokenizer.tokenize_batch([]) == []


def test_a_feature_extractor_that_does_not_fit_is_rejected(tokenizer):
    from transformers import WhisperFeatureExtractor

    with pytest.raises(FeatureExtractorMismatch, match="feature_size 80"):
        SpeechTokenizer(tokenizer.model, WhisperFeatureExtractor(feature_size=80))


def test_original_import_paths_and_call(tiny_checkpoints, speechlike):
    """As web_demo.py of the original uses them."""
    from transformers import WhisperFeatureExtractor

    from speech_tokenizer.modeling_whisper import WhisperVQEncoder as OriginalPathModel
    from speech_tokenizer.utils import extract_speech_token as original_path_function

    model = OriginalPathModel.from_pretrained(tiny_checkpoints.speech_tokenizer).eval().to("cpu")
    fe = WhisperFeatureExtractor.from_pretrained(tiny_checkpoints.speech_tokenizer)
    wave = speechlike(2.0)
    codes = original_path_function(model, fe, [(torch.from_numpy(wave)[None], RATE)])
    assert isinstance(codes, list) and len(codes) == 1 and len(codes[0]) == 25
    stride = model.conv1.stride[0] * model.conv2.stride[0] * model.config.pooling_kernel_size * fe.hop_length
    features = fe(
        [wave],
        sampling_rate=RATE,
        return_attention_mask=True,
        return_tensors="pt",
        padding="longest",
        pad_to_multiple_of=stride,
    )
    outputs = model(**features)
    assert outputs.quantized_token_ids[0].tolist() == codes[0]


@pytest.mark.gpu
def test_runs_on_cuda(tiny_checkpoints, speechlike):
    gpu = SpeechTokenizer.from_pretrained(tiny_checkpoints.speech_tokenizer, device="cuda")
    cpu = SpeechTokenizer.from_pretrained(tiny_checkpoints.speech_tokenizer, device="cpu")
    assert gpu.device.type == "cuda"
    waves = [(speechlike(s, seed=i), RATE) for i, s in enumerate((3.0, 0.7, 31.0))]
    on_gpu, on_cpu = gpu.tokenize_batch(waves), cpu.tokenize_batch(waves)
    assert [len(c) for c in on_gpu] == [len(c) for c in on_cpu]
    same = np.mean(np.concatenate([np.array(a) == np.array(b) for a, b in zip(on_gpu, on_cpu)]))
    assert same > 0.9, same  # cuDNN runs the convolutions in TF32 by default (as for the original)
