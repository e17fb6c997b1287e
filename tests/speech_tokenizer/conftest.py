"""Fixtures of the speech tokenizer tests: the tiny tokenizer and synthetic speech-like signals."""

from __future__ import annotations

import numpy as np
import pytest

from glm4voice.audio import INPUT_SAMPLE_RATE


def make_speechlike(
    seconds: float,
    rate: int = INPUT_SAMPLE_RATE,
    *,
    f0: float = 150.0,
    seed: int = 0,
    noise: float = 0.01,
    level: float = 0.2,
) -> np.ndarray:
    """A voiced-sounding test signal: gliding harmonics (all below 4 kHz) with a syllable-rate
    envelope, plus a little noise. Without noise it is the same continuous signal at any rate."""
    count = round(seconds * rate)
    time = np.arange(count) / rate
    glide_rate, glide = 0.7, 60.0
    phase = 2 * np.pi * (f0 * time - glide * np.cos(2 * np.pi * glide_rate * time) / (2 * np.pi * glide_rate))
    harmonics = [k for k in range(1, 16) if k * (f0 + glide) < 3800.0]
    voiced = sum(np.sin(k * phase) / k for k in harmonics)
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * time)) ** 2
    hiss = noise * np.random.default_rng(seed).standard_normal(count)
    return (level * voiced * envelope + hiss).astype(np.float32)


@pytest.fixture(scope="session")
def speechlike():
    return make_speechlike


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoints):
    from speech_tokenizer import SpeechTokenizer

    return SpeechTokenizer.from_pretrained(tiny_checkpoints.speech_tokenizer, device="cpu")


@pytest.fixture(scope="session")
def feature_extractor(tokenizer):
    return tokenizer.feature_extractor
