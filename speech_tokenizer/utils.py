"""``extract_speech_token``: the original's entry point, same call and result.

``extract_speech_token(model, feature_extractor, utts)`` takes a list of audio file paths or
``(waveform, sample_rate)`` tuples (``waveform`` shaped (channels, samples) as ``torchaudio.load``
returns it, or 1-D) and returns one list of code ids per utterance.

As in the original, only the FIRST channel of multi-channel audio is used (not a mix), and there
is no length limit (long audio is processed 30 s piece by piece in bounded memory). Differences:
resampling to 16 kHz uses soxr (the original used torchaudio's sinc resampler, so non-16 kHz input
may differ in a few codes; 16 kHz input is unaffected); audio that is empty, not finite or not
readable raises a :class:`glm4voice.audio.AudioError` instead of failing somewhere inside; each
utterance gets the codes the original gives it when called with that utterance alone (the
original pads all pieces of one call into one feature batch, so a short utterance's last feature
frame could depend on the longer utterances it was called with; see ``speech_tokenizer.pipeline``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from glm4voice.audio import INPUT_SAMPLE_RATE, AudioError, load_audio
from speech_tokenizer.pipeline import DEFAULT_BATCH_SIZE, tokenize_waveforms

Utterance = str | os.PathLike | tuple[np.ndarray, int]  # (waveform: an array or a torch tensor, sample rate)


def extract_speech_token(
    model, feature_extractor, utts: Sequence[Utterance], *, batch_size: int = DEFAULT_BATCH_SIZE
) -> list[list[int]]:
    """Code ids (12.5 per second) for each utterance; runs on the model's device."""
    if isinstance(utts, (str, os.PathLike)) or _is_single_utterance(utts):
        raise TypeError(
            "utts must be a list of utterances (paths or (waveform, sample_rate) tuples), not one utterance"
        )
    waveforms = [first_channel_16k(utt) for utt in utts]
    return tokenize_waveforms(model, feature_extractor, waveforms, batch_size=batch_size)


def _is_single_utterance(utts) -> bool:
    return (
        isinstance(utts, tuple)
        and len(utts) == 2
        and isinstance(utts[1], int)
        and not isinstance(utts[0], (str, os.PathLike))
    )


def first_channel_16k(utt: Utterance) -> np.ndarray:
    """The first channel of an utterance, validated and resampled to 16 kHz (float32)."""
    if isinstance(utt, tuple):
        if len(utt) != 2:
            raise AudioError("an utterance tuple must be (waveform, sample_rate)")
    elif not isinstance(utt, (str, os.PathLike)):
        raise AudioError(
            f"an utterance must be a file path or a (waveform, sample_rate) tuple, got {type(utt).__name__}"
        )
    return load_audio(utt, sample_rate=INPUT_SAMPLE_RATE, max_seconds=None, mix="first").samples
