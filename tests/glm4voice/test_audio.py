import functools
import io

import numpy as np
import pytest
import soundfile as sf

from glm4voice import audio
from glm4voice.audio import (
    AudioError,
    AudioTooLongError,
    CorruptAudioError,
    EmptyAudioError,
    NonFiniteAudioError,
    load_audio,
)


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def test_constants_are_consistent():
    assert audio.INPUT_SAMPLE_RATE == 16000
    assert audio.OUTPUT_SAMPLE_RATE == 22050
    assert audio.MEL_HOP_LENGTH == 256
    assert audio.NUM_MEL_BINS == 80
    assert audio.SPEECH_TOKEN_RATE == 12.5
    assert audio.SPEAKER_EMBEDDING_DIM == 192
    assert audio.SAMPLES_PER_SPEECH_TOKEN == 1280  # 1 * 2 * 4 * 160: conv strides x pooling x hop
    assert audio.OUTPUT_SAMPLES_PER_TOKEN == 1764
    assert pytest.approx(6.890625) == audio.MEL_FRAMES_PER_TOKEN


@pytest.mark.parametrize(
    "fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]
)
def test_reads_encoded_files_and_bytes(tmp_path, fmt, subtype):
    rate = 24000
    original = sine(440, 1.0, rate)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, original, rate, format=fmt, subtype=subtype)
    from_path = load_audio(path)
    from_bytes = load_audio(path.read_bytes())
    for result in (from_path, from_bytes):
        assert result.sample_rate == 16000
        assert result.samples.dtype == np.float32
        # lossy codecs may add encoder delay/padding; length within 0.1 s
        assert abs(result.duration - 1.0) < 0.1
        assert dominant_frequency(result.samples, 16000) == pytest.approx(440, abs=5)
    np.testing.assert_array_equal(from_path.samples, from_bytes.samples)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resamples_any_rate_to_16k(rate):
    result = load_audio(sine(1000, 2.0, rate), source_rate=rate)
    assert result.sample_rate == 16000
    assert len(result.samples) == pytest.approx(32000, abs=2)
    assert dominant_frequency(result.samples, 16000) == pytest.approx(1000, abs=3)
    # energy is preserved by a good resampler (sine RMS = amplitude / sqrt 2)
    middle = result.samples[2000:-2000]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_keeps_rate_when_asked():
    result = load_audio(sine(300, 0.5, 44100), source_rate=44100, sample_rate=None)
    assert result.sample_rate == 44100 and len(result.samples) == 22050


def test_stereo_is_averaged_in_either_layout(tmp_path):
    left, right = sine(300, 1.0, 16000), sine(300, 1.0, 16000, amplitude=0.1)
    frames_first = np.stack([left, right], axis=1)  # (samples, channels)
    channels_first = frames_first.T
    expected = (left + right) / 2
    np.testing.assert_allclose(load_audio(frames_first, source_rate=16000).samples, expected, atol=1e-6)
    np.testing.assert_allclose(load_audio(channels_first, source_rate=16000).samples, expected, atol=1e-6)
    path = tmp_path / "stereo.wav"
    sf.write(path, frames_first, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path).samples, expected, atol=1e-6)


def test_integer_arrays_and_tuples():
    pcm = (sine(200, 0.25, 16000) * 32767).astype(np.int16)
    result = load_audio((pcm, 16000))
    assert np.abs(result.samples).max() == pytest.approx(0.5, abs=1e-3)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(sine(200, 0.25, 16000))[None]  # (1, samples) as torchaudio gives
    assert len(load_audio(tensor, source_rate=16000).samples) == 4000


@pytest.mark.parametrize(
    "source,kwargs,error",
    [
        (b"", {}, EmptyAudioError),
        (np.zeros(0, np.float32), {"source_rate": 16000}, EmptyAudioError),
        (np.zeros((0, 2), np.float32), {"source_rate": 16000}, EmptyAudioError),
        (b"RIFF\x00\x00\x00\x00WAVEfmt garbage", {}, CorruptAudioError),
        (bytes(range(256)) * 40, {}, CorruptAudioError),
        (np.array([0.1, np.nan, 0.2], np.float32), {"source_rate": 16000}, NonFiniteAudioError),
        (np.array([0.1, np.inf], np.float32), {"source_rate": 16000}, NonFiniteAudioError),
        (np.zeros(16000 * 11, np.float32), {"source_rate": 16000, "max_seconds": 10}, AudioTooLongError),
        (np.zeros(100, np.float32), {}, AudioError),  # array without a rate
        (np.zeros(100, np.float32), {"source_rate": 0}, AudioError),
        (np.zeros((2, 2, 2), np.float32), {"source_rate": 16000}, AudioError),
        (np.array(["a", "b"]), {"source_rate": 16000}, AudioError),
        (12345, {}, AudioError),
        ("/no/such/file.wav", {}, AudioError),
    ],
)
def test_bad_input_raises_clear_errors(source, kwargs, error):
    with pytest.raises(error) as info:
        load_audio(source, **kwargs)
    assert str(info.value)  # every error carries a message for the user
    assert isinstance(info.value, AudioError) and isinstance(info.value, ValueError)


def test_empty_and_text_files(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(EmptyAudioError):
        load_audio(empty)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio")
    with pytest.raises(CorruptAudioError, match="notes.wav"):
        load_audio(text)
    with pytest.raises(AudioError, match="no audio file"):
        load_audio(tmp_path)


def test_silence_is_valid_audio():
    result = load_audio(np.zeros(8000, np.float32), source_rate=8000)
    assert len(result.samples) == 16000 and not result.samples.any()


def test_encode_wav_round_trip():
    samples = sine(500, 0.3, 22050)
    data = audio.encode_wav(samples, 22050)
    decoded, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 22050
    np.testing.assert_allclose(decoded, samples, atol=1 / 32767 + 1e-6)


def test_first_channel_mix_keeps_channel_zero():
    left, right = sine(300, 0.5, 16000), sine(300, 0.5, 16000, amplitude=0.1)
    stereo = np.stack([left, right])  # (channels, samples)
    np.testing.assert_array_equal(load_audio(stereo, source_rate=16000, mix="first").samples, left)
    np.testing.assert_array_equal(load_audio(stereo.T, source_rate=16000, mix="first").samples, left)
    with pytest.raises(ValueError):
        load_audio(stereo, source_rate=16000, mix="loudest")


# --- files are checked from their header and decoded bounded ------------------------------------------


def write_flac(path, seconds: float, channels: int, rate: int, amplitude: float = 0.0) -> None:
    """A FLAC of ``seconds`` (silence or a tone in every channel), written a block at a time."""
    block = np.zeros((rate * 10, channels), np.float32)
    if amplitude:
        block[:] = sine(440, 10.0, rate, amplitude)[:, None]
    with sf.SoundFile(path, "w", rate, channels, format="FLAC", subtype="PCM_16") as out:
        left = int(seconds * rate)
        while left > 0:
            out.write(block[: min(left, len(block))])
            left -= len(block)


def peak_memory(fn) -> tuple[object, int]:
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            result = fn()
        except Exception as error:  # noqa: BLE001 - returned for the caller's assertions
            result = error
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    """5 min of 8-channel 48 kHz silence: ~0.1 MiB of FLAC, 460 MB once decoded as float32."""
    bomb = tmp_path / "bomb.flac"
    write_flac(bomb, 300, 8, 48000)
    assert bomb.stat().st_size < 2**20
    for source in (bomb, bomb.read_bytes()):
        error, peak = peak_memory(functools.partial(load_audio, source, max_seconds=120))
        assert isinstance(error, AudioTooLongError) and "300.0 s long" in str(error), error
        assert peak < 8 * 2**20, peak  # the file's bytes at most, nothing decoded


def test_long_many_channel_files_decode_in_bounded_memory(tmp_path):
    """60 s of 8-channel 48 kHz audio (92 MB as float32) is accepted with memory near the 16 kHz mono output."""
    path = tmp_path / "long.flac"
    write_flac(path, 60, 8, 48000, amplitude=0.5)
    result, peak = peak_memory(lambda: load_audio(path, max_seconds=120))
    assert not isinstance(result, Exception), result
    assert result.sample_rate == 16000 and len(result.samples) == 60 * 16000
    assert dominant_frequency(result.samples[:16000], 16000) == pytest.approx(440, abs=3)
    assert peak < 24 * 2**20, peak  # output 3.8 MB + one block of 1 Mi samples (4 MB) + concatenation


def test_block_decoding_equals_decoding_at_once(tmp_path, monkeypatch):
    rate = 44100
    rng = np.random.default_rng(0)
    stereo = (0.3 * rng.standard_normal((rate * 2 + 123, 2))).astype(np.float32)
    path = tmp_path / "noise.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")
    whole = load_audio(path)
    monkeypatch.setattr(audio, "DECODE_BLOCK_SAMPLES", 1000)  # 500 frames per block
    blocks = load_audio(path)
    np.testing.assert_array_equal(blocks.samples, whole.samples)
    expected = audio.resample(stereo.mean(axis=1), rate, 16000)
    np.testing.assert_allclose(whole.samples, expected, atol=1e-6)
    kept = load_audio(path, sample_rate=None, mix="first")
    np.testing.assert_array_equal(kept.samples, stereo[:, 0])


def test_decoding_stops_one_sample_past_the_limit(tmp_path, monkeypatch):
    """Past the header check, no more than the limit plus one sample is decoded (a header may
    under-state a compressed stream's length)."""
    path = tmp_path / "tone.wav"
    sf.write(path, sine(440, 3.0, 16000), 16000)
    monkeypatch.setattr(audio, "DECODE_BLOCK_SAMPLES", 5000)
    with sf.SoundFile(path) as sound:
        with pytest.raises(AudioTooLongError, match="longer than 2 s"):
            audio._decode_blocks(sound, 1, 2.0, 16000, "mean")
        assert sound.tell() == 2 * 16000 + 1


def test_errors_name_no_folder(tmp_path):
    for source in (tmp_path / "missing.wav", tmp_path):
        with pytest.raises(AudioError) as info:
            load_audio(source)
        assert str(tmp_path) not in str(info.value) and "no audio file" in str(info.value)
