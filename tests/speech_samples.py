"""Spoken test inputs made with espeak-ng (installed on the test machines), with where their speech is."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from glm4voice import espeak as _espeak
from glm4voice.audio import Audio

SPEECH_FLOOR_DB = -40.0
"""A sample louder than this (dBFS) is speech; the first and last such samples bound an utterance."""


@dataclass(frozen=True)
class Utterance:
    audio: Audio
    start: int
    """First sample of speech."""
    end: int
    """One past the last sample of speech."""

    def ms(self, sample: int) -> float:
        return sample * 1000 / self.audio.sample_rate


espeak_available = _espeak.espeak_available


@cache
def espeak(text: str, voice: str = "en-us", sample_rate: int = 16_000) -> Utterance:
    """``text`` spoken by espeak-ng at ``sample_rate`` (mono float)."""
    audio = _espeak.speak(text, voice, sample_rate=sample_rate)
    loud = np.flatnonzero(np.abs(audio.samples) > 10 ** (SPEECH_FLOOR_DB / 20))
    return Utterance(audio, int(loud[0]), int(loud[-1]) + 1)


def with_silence(utterance: Utterance, before_s: float, after_s: float) -> Utterance:
    """The utterance with digital silence around it (boundaries moved accordingly)."""
    rate = utterance.audio.sample_rate
    head, tail = int(before_s * rate), int(after_s * rate)
    samples = np.concatenate([np.zeros(head, np.float32), utterance.audio.samples, np.zeros(tail, np.float32)]).astype(
        np.float32
    )
    return Utterance(Audio(samples, rate), utterance.start + head, utterance.end + head)
