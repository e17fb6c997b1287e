"""Files for chromium's fake microphone (``--use-file-for-fake-audio-capture``): espeak-ng questions with
silences between them. The capture starts at the file's beginning when the page opens the microphone,
and the file loops: a file for a fixed number of turns ends with a silence longer than the test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from speech_samples import espeak

RATE = 16_000
LEAD_S = 0.5
"""Silence before the first question (the microphone's start)."""


@dataclass(frozen=True)
class FakeMicrophone:
    path: Path
    onsets_s: tuple[float, ...]
    """Where each question's speech begins in the file."""
    ends_s: tuple[float, ...]
    """Where each question's speech ends."""
    duration_s: float


def write_microphone(path: Path, questions: list[tuple[str, float]]) -> FakeMicrophone:
    """``questions``: (text, silence after it in seconds), spoken in order after LEAD_S of silence."""
    parts, onsets, ends, position = [np.zeros(int(LEAD_S * RATE), np.float32)], [], [], int(LEAD_S * RATE)
    for text, silence_s in questions:
        utterance = espeak(text, sample_rate=RATE)
        onsets.append((position + utterance.start) / RATE)
        ends.append((position + utterance.end) / RATE)
        parts += [utterance.audio.samples, np.zeros(int(silence_s * RATE), np.float32)]
        position += len(utterance.audio.samples) + int(silence_s * RATE)
    samples = np.concatenate(parts)
    sf.write(str(path), samples, RATE, subtype="PCM_16")
    return FakeMicrophone(path, tuple(onsets), tuple(ends), len(samples) / RATE)
