"""Audio constants of the three GLM-4-Voice models, and robust audio loading.

Every rate and size used elsewhere is defined (or derived) here once.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

# --- speech tokenizer (Whisper-VQ) input --------------------------------------------------------
INPUT_SAMPLE_RATE = 16_000
"""The speech tokenizer consumes 16 kHz mono audio."""
WHISPER_HOP_LENGTH = 160
"""Whisper log-mel hop (10 ms at 16 kHz): 100 feature frames per second."""
WHISPER_CHUNK_SECONDS = 30
"""Whisper's window: longer audio is tokenized in consecutive 30 s pieces."""
WHISPER_CHUNK_SAMPLES = WHISPER_CHUNK_SECONDS * INPUT_SAMPLE_RATE
SPEECH_TOKEN_RATE = 12.5
"""Audio tokens per second of speech (tokenizer output, LLM audio rate, decoder input)."""
SAMPLES_PER_SPEECH_TOKEN = int(INPUT_SAMPLE_RATE / SPEECH_TOKEN_RATE)  # 1280 input samples = 80 ms
NUM_AUDIO_CODES = 16_384
"""Size of the speech tokenizer's codebook (and of the decoder's token embedding)."""

# --- speech decoder (flow matching + HiFT) output ---------------------------------------------------
OUTPUT_SAMPLE_RATE = 22_050
"""The HiFT vocoder produces 22.05 kHz audio."""
MEL_HOP_LENGTH = 256
"""Samples per mel frame of the decoder (and per vocoder source-cache frame)."""
NUM_MEL_BINS = 80
MEL_FRAME_RATE = OUTPUT_SAMPLE_RATE / MEL_HOP_LENGTH  # 86.13 frames/s
MEL_FRAMES_PER_TOKEN = MEL_FRAME_RATE / SPEECH_TOKEN_RATE  # 6.890625
OUTPUT_SAMPLES_PER_TOKEN = int(OUTPUT_SAMPLE_RATE / SPEECH_TOKEN_RATE)  # 1764
SPEAKER_EMBEDDING_DIM = 192

# --- input limits -----------------------------------------------------------------------------------
DEFAULT_MAX_INPUT_SECONDS = 600.0
"""Longest input accepted by default (10 minutes); the demo sets a tighter limit."""
MIN_INPUT_SECONDS = 0.0
MAX_FILE_BYTES = 200 * 1024 * 1024

ChannelMix = Literal["mean", "first"]
"""How multi-channel audio becomes mono: the mean of the channels, or the first channel only (the
original speech tokenizer's behaviour)."""

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, "tuple[np.ndarray, int]"]


class AudioError(ValueError):
    """Audio input that cannot be used. The message is meant for the person who gave it."""


class EmptyAudioError(AudioError):
    """The input holds no samples."""


class CorruptAudioError(AudioError):
    """The input is not a readable audio file (or is not audio at all)."""


class NonFiniteAudioError(AudioError):
    """The samples contain NaN or infinity."""


class AudioTooLongError(AudioError):
    """The input is longer than the configured limit."""


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples in [-1, 1] (not clipped) at a known sample rate."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def load_audio(
    source: AudioSource,
    sample_rate: int | None = INPUT_SAMPLE_RATE,
    *,
    source_rate: int | None = None,
    max_seconds: float | None = DEFAULT_MAX_INPUT_SECONDS,
    mix: ChannelMix = "mean",
) -> Audio:
    """Read audio from a file path, encoded bytes (wav/flac/ogg/mp3), or an array.

    Arrays are (samples,) or (samples, channels) (the longer axis is taken as time if the
    shape is ambiguous in the other order) and need ``source_rate``; a ``(array, rate)`` tuple
    also works. Multi-channel input is averaged to mono (``mix="first"`` keeps the first channel
    instead). The result is resampled to
    ``sample_rate`` with soxr (``None`` keeps the source rate).

    Raises an :class:`AudioError` subclass for empty, unreadable, non-finite or too-long input.
    """
    samples, rate = _read(source, source_rate)
    samples = _to_mono(samples, mix)
    if samples.size == 0:
        raise EmptyAudioError("the audio is empty (no samples)")
    if not np.all(np.isfinite(samples)):
        raise NonFiniteAudioError("the audio contains NaN or infinite sample values")
    duration = samples.shape[0] / rate
    if max_seconds is not None and duration > max_seconds:
        raise AudioTooLongError(f"the audio is {duration:.1f} s long; the limit is {max_seconds:.0f} s")
    if sample_rate is not None and rate != sample_rate:
        samples = resample(samples, rate, sample_rate)
        rate = sample_rate
    return Audio(np.ascontiguousarray(samples, dtype=np.float32), int(rate))


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """High-quality resampling of mono float samples (soxr 'HQ')."""
    if source_rate == target_rate:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples.astype(np.float32, copy=False), source_rate, target_rate, quality="HQ")


def encode_wav(samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """Encode mono float samples as a WAV file in memory."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), sample_rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def _read(source: AudioSource, source_rate: int | None) -> tuple[np.ndarray, int]:
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError("an audio tuple must be (samples, sample_rate)")
        array, rate = source
        return _from_array(array, rate)
    if isinstance(source, np.ndarray) or _is_tensor(source):
        if source_rate is None:
            raise AudioError("a sample array needs its sample rate (source_rate)")
        return _from_array(source, source_rate)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise EmptyAudioError("the audio file is empty (0 bytes)")
        if len(data) > MAX_FILE_BYTES:
            raise AudioTooLongError(f"the audio file is {len(data) / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES / 2**20:.0f} MiB")
        return _decode(io.BytesIO(data), "the audio data")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"no audio file at {path}")
        size = path.stat().st_size
        if size == 0:
            raise EmptyAudioError(f"the audio file {path.name} is empty (0 bytes)")
        if size > MAX_FILE_BYTES:
            raise AudioTooLongError(f"the audio file {path.name} is {size / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES / 2**20:.0f} MiB")
        return _decode(path, f"the file {path.name}")
    raise AudioError(f"unsupported audio input of type {type(source).__name__}")


def _decode(file: "io.BytesIO | Path", what: str) -> tuple[np.ndarray, int]:
    try:
        samples, rate = sf.read(file, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise CorruptAudioError(f"{what} is not a readable audio file (wav, flac, ogg or mp3): {error}") from error
    if rate <= 0:
        raise CorruptAudioError(f"{what} declares an invalid sample rate ({rate})")
    return samples, int(rate)


def _from_array(array: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    try:
        rate = int(rate)
    except (TypeError, ValueError) as error:
        raise AudioError(f"invalid sample rate {rate!r}") from error
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    array = np.asarray(_as_numpy(array))
    if array.ndim == 0 or array.ndim > 2:
        raise AudioError(f"audio arrays must be 1-D or 2-D, got shape {array.shape}")
    if array.size == 0:
        raise EmptyAudioError("the audio is empty (no samples)")
    if np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    elif not np.issubdtype(array.dtype, np.floating):
        raise AudioError(f"audio samples must be numbers, got dtype {array.dtype}")
    if array.ndim == 2 and array.shape[0] < array.shape[1]:
        array = array.T  # (channels, samples) -> (samples, channels)
    return array.astype(np.float32, copy=False), rate


def _is_tensor(value) -> bool:
    return hasattr(value, "detach") and hasattr(value, "cpu")


def _as_numpy(array) -> np.ndarray:
    """Accept torch tensors without importing torch here."""
    if _is_tensor(array):
        return array.detach().cpu().float().numpy()
    return array


def _to_mono(samples: np.ndarray, mix: ChannelMix) -> np.ndarray:
    if samples.ndim == 1:
        return samples
    if mix == "first" or samples.shape[1] == 1:
        return samples[:, 0]
    if mix != "mean":
        raise ValueError(f"unknown channel mix {mix!r}")
    return samples.mean(axis=1)
