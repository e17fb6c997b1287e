"""silero-vad turn detection: the hysteresis on frame probabilities, and the real model on espeak-ng
speech (boundaries in audio time, so the results do not depend on the machine's load)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest

from glm4voice.conversation.vad import (
    FRAME_SAMPLES,
    SpeechSegmenter,
    SpeechStart,
    SpeechStop,
    TurnDetection,
    VoiceActivityDetector,
    samples_to_ms,
)

from speech_samples import espeak, espeak_available, with_silence
from support import ROOT

TOLERANCE_MS = 100
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")


def run_segmenter(probabilities, **config) -> list:
    segmenter = SpeechSegmenter(TurnDetection(**config))
    return [b for p in probabilities if (b := segmenter.feed(p)) is not None]


def test_speech_starts_at_the_first_frame_above_the_threshold_and_stops_after_the_silence():
    # 3 quiet frames, 10 speech frames, a short dip (2 frames), 5 speech frames, then silence
    probabilities = [0.1] * 3 + [0.9] * 10 + [0.1] * 2 + [0.8] * 5 + [0.05] * 30
    found = run_segmenter(probabilities, silence_duration_ms=160)  # 5 frames
    silence_start = (3 + 10 + 2 + 5) * FRAME_SAMPLES
    assert found == [SpeechStart(3 * FRAME_SAMPLES), SpeechStop(silence_start, silence_start + 5 * FRAME_SAMPLES)]


def test_probabilities_between_the_two_thresholds_neither_start_nor_end_a_silence():
    # 0.4 is below the 0.5 start threshold but above the 0.35 stop threshold
    assert run_segmenter([0.4] * 50) == []
    found = run_segmenter([0.9] + [0.4] * 40 + [0.0] * 20, silence_duration_ms=320)
    assert found == [SpeechStart(0), SpeechStop(41 * FRAME_SAMPLES, 51 * FRAME_SAMPLES)]


def test_force_stop_ends_the_speech_where_it_is():
    segmenter = SpeechSegmenter(TurnDetection())
    assert segmenter.force_stop() is None
    for p in [0.9] * 4:
        segmenter.feed(p)
    assert segmenter.force_stop() == SpeechStop(4 * FRAME_SAMPLES, 4 * FRAME_SAMPLES) and not segmenter.in_speech


def test_turn_detection_settings_are_checked():
    for bad in (dict(threshold=0), dict(threshold=1.5), dict(prefix_padding_ms=-1), dict(silence_duration_ms=10)):
        with pytest.raises(ValueError):
            TurnDetection(**bad)


def test_the_model_file_comes_from_the_installed_wheel_without_importing_silero_vad():
    """silero_vad's import would set torch's thread count for the whole process."""
    code = (
        "import asyncio, sys, torch; from glm4voice.conversation.vad import SileroVAD; threads = torch.get_num_threads(); "
        "vad = asyncio.run(SileroVAD.load()); print(SileroVAD.model_path().name, 'silero_vad' in sys.modules, "
        "torch.get_num_threads() == threads)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["silero_vad.jit", "False", "True"]


@needs_espeak
@pytest.mark.parametrize(
    "text, voice",
    [("Hello! What is the weather like today in Paris?", "en-us"), ("你好，请给我讲一个故事。", "cmn")],
)
def test_speech_boundaries_of_spoken_questions(vad, text, voice):
    utterance = with_silence(espeak(text, voice), before_s=1.0, after_s=1.5)
    detector = VoiceActivityDetector(vad, TurnDetection())

    async def feed_in_chunks():
        found = []
        samples = utterance.audio.samples
        for start in range(0, len(samples), 480):  # 30 ms appends, not aligned with the 32 ms frames
            found += await vad.run(detector.feed, samples[start : start + 480])
        return found

    start, stop = asyncio.run(feed_in_chunks())
    assert isinstance(start, SpeechStart) and isinstance(stop, SpeechStop)
    assert abs(samples_to_ms(start.sample) - utterance.ms(utterance.start)) <= TOLERANCE_MS
    assert abs(samples_to_ms(stop.sample) - utterance.ms(utterance.end)) <= TOLERANCE_MS
    assert stop.decided - stop.sample >= 500 * 16  # the default silence duration, in samples


def test_silence_and_noise_floor_are_not_speech(vad):
    rng = np.random.default_rng(0)
    quiet = (0.001 * rng.standard_normal(16_000 * 3)).astype(np.float32)
    detector = VoiceActivityDetector(vad, TurnDetection())
    assert asyncio.run(vad.run(detector.feed, quiet)) == []
    assert detector.position == len(quiet) - len(quiet) % FRAME_SAMPLES


def test_the_vad_worker_runs_torch_on_one_thread_and_leaves_the_process_setting(vad):
    import torch

    before = torch.get_num_threads()
    in_worker = asyncio.run(vad.run(torch.get_num_threads))
    assert in_worker == 1
    assert torch.get_num_threads() == before
