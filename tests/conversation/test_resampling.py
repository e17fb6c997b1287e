"""Streaming resampling: any chunking gives the samples of resampling the whole signal at once."""

from __future__ import annotations

import numpy as np
import pytest

from glm4voice.audio import resample
from glm4voice.conversation.resampling import StreamResampler


@pytest.mark.parametrize("source, target", [(22_050, 24_000), (24_000, 16_000), (16_000, 16_000)])
def test_chunked_resampling_equals_the_offline_result(source, target):
    rng = np.random.default_rng(0)
    signal = (0.3 * np.sin(np.arange(source) * 2 * np.pi * 440 / source) + 0.05 * rng.standard_normal(source)).astype(
        np.float32
    )
    stream = StreamResampler(source, target)
    cuts = np.cumsum(rng.integers(1, 3000, size=40))
    pieces = [stream.feed(part) for part in np.split(signal, cuts[cuts < len(signal)])] + [stream.flush()]
    streamed = np.concatenate(pieces)
    np.testing.assert_array_equal(streamed, resample(signal, source, target))
    assert stream.samples_in == len(signal) and stream.samples_out == len(streamed)
    assert len(streamed) == round(len(signal) * target / source)
