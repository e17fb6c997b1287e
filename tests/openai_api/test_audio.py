"""Audio of the API: pcm16 conversion, strict base64, whole answers in each output format."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from glm4voice.openai_api.audio import (
    API_SAMPLE_RATE,
    FILE_FORMATS,
    decode_base64,
    encode_answer,
    pcm16_to_float,
    to_pcm16,
)


def test_pcm16_round_trip_and_clipping():
    samples = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0], dtype=np.float32)
    pcm = to_pcm16(samples)
    assert pcm.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767]
    np.testing.assert_allclose(pcm16_to_float(pcm.tobytes()), np.clip(samples, -1, 1), atol=1 / 32767)
    with pytest.raises(ValueError, match="even number"):
        pcm16_to_float(b"abc")


def test_base64_is_checked_strictly():
    assert decode_base64("aGVsbG8=") == b"hello"
    for bad in ("aGVsbG8", "aGVs bG8=", "@@@@", 5):
        with pytest.raises(ValueError):
            decode_base64(bad)


@pytest.mark.parametrize("fmt", sorted(FILE_FORMATS))
def test_whole_answers_decode_in_each_format(fmt):
    tone = to_pcm16(0.3 * np.sin(np.arange(API_SAMPLE_RATE) * 2 * np.pi * 440 / API_SAMPLE_RATE))
    data, rate = sf.read(io.BytesIO(encode_answer(tone, API_SAMPLE_RATE, fmt)), dtype="int16")
    assert rate == API_SAMPLE_RATE and abs(len(data) - len(tone)) < API_SAMPLE_RATE // 10
    if fmt in ("wav", "flac"):  # lossless
        np.testing.assert_array_equal(data, tone)
    assert encode_answer(tone, API_SAMPLE_RATE, "pcm16") == tone.tobytes()
