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
MAX_FILE_SAMPLE_RATE = 384_000
"""Highest sample rate of an audio file that is decoded (above any recording's; FLAC allows 655 kHz)."""
DECODE_BLOCK_SAMPLES = 1 << 20
"""A file is decoded this many samples (all channels together) at a time, each block mixed to mono
and resampled before the next is read: memory follows the output, not the file's channels and rate."""

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

    Files are checked before they are decoded: a header that declares more than ``max_seconds``
    is refused at once, and decoding reads at most ``max_seconds`` (plus one sample) block by
    block, mixing and resampling each block (:data:`DECODE_BLOCK_SAMPLES`), so a small file that
    unpacks into hours of many-channel audio costs no more memory than the accepted output.

    Raises an :class:`AudioError` subclass for empty, unreadable, non-finite or too-long input.
    Messages name at most a file's name, never the folder it is in.
    """
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        samples, rate = _read_file(source, sample_rate, max_seconds, mix)
    else:
        samples, rate = _read(source, source_rate)
        samples = _to_mono(samples, mix)
        _check_samples(samples)
    if samples.size == 0:
        raise EmptyAudioError("the audio is empty (no samples)")
    duration = samples.shape[0] / rate
    if max_seconds is not None and duration > max_seconds:
        raise AudioTooLongError(f"the audio is {duration:.1f} s long; the limit is {max_seconds:.0f} s")
    if sample_rate is not None and rate != sample_rate:
        samples = resample(samples, rate, sample_rate)
        rate = sample_rate
    return Audio(np.ascontiguousarray(samples, dtype=np.float32), int(rate))


def _check_samples(samples: np.ndarray) -> None:
    if not np.all(np.isfinite(samples)):
        raise NonFiniteAudioError("the audio contains NaN or infinite sample values")


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """High-quality resampling of mono float samples (soxr 'HQ')."""
    if source_rate == target_rate:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples.astype(np.float32, copy=False), source_rate, target_rate, quality="HQ")


PCM_DTYPE = np.dtype("<i2")
"""16-bit little-endian PCM: the page player's frames and the OpenAI API's ``pcm16``."""
PCM_SCALE = 32767


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] (clipped) as 16-bit PCM."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    return np.round(np.clip(samples, -1.0, 1.0) * PCM_SCALE).astype(PCM_DTYPE)


def encode_wav(samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """Encode mono float samples as a WAV file in memory."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), sample_rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def _read(source: AudioSource, source_rate: int | None) -> tuple[np.ndarray, int]:
    """Samples and rate of an array source (files: :func:`_read_file`)."""
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioError("an audio tuple must be (samples, sample_rate)")
        array, rate = source
        return _from_array(array, rate)
    if isinstance(source, np.ndarray) or _is_tensor(source):
        if source_rate is None:
            raise AudioError("a sample array needs its sample rate (source_rate)")
        return _from_array(_as_numpy(source), source_rate)
    raise AudioError(f"unsupported audio input of type {type(source).__name__}")


def _read_file(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    sample_rate: int | None,
    max_seconds: float | None,
    mix: ChannelMix,
) -> tuple[np.ndarray, int]:
    """Mono samples of an encoded file (a path or its bytes), at ``sample_rate`` (None: the file's),
    decoded bounded (see :func:`load_audio`)."""
    limit = f"the limit is {MAX_FILE_BYTES / 2**20:.0f} MiB"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise EmptyAudioError("the audio file is empty (0 bytes)")
        if len(data) > MAX_FILE_BYTES:
            raise AudioTooLongError(f"the audio file is {len(data) / 2**20:.0f} MiB; {limit}")
        return _decode(io.BytesIO(data), "the audio data", sample_rate, max_seconds, mix)
    path = Path(source)
    if not path.is_file():  # also refuses devices and pipes, which could be read forever
        raise AudioError(f"there is no audio file named {path.name!r}")
    size = path.stat().st_size
    if size == 0:
        raise EmptyAudioError(f"the audio file {path.name} is empty (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise AudioTooLongError(f"the audio file {path.name} is {size / 2**20:.0f} MiB; {limit}")
    return _decode(path, f"the file {path.name}", sample_rate, max_seconds, mix)


def _decode(
    file: io.BytesIO | Path, what: str, sample_rate: int | None, max_seconds: float | None, mix: ChannelMix
) -> tuple[np.ndarray, int]:
    try:
        with sf.SoundFile(file) as sound:
            rate, channels, frames = int(sound.samplerate), int(sound.channels), int(sound.frames)
            if not 0 < rate <= MAX_FILE_SAMPLE_RATE or channels <= 0:
                raise CorruptAudioError(f"{what} declares an unsupported format ({channels} channels at {rate} Hz)")
            if max_seconds is not None and frames / rate > max_seconds:
                raise AudioTooLongError(f"the audio is {frames / rate:.1f} s long; the limit is {max_seconds:.0f} s")
            return _decode_blocks(sound, channels, max_seconds, sample_rate, mix), sample_rate or rate
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise CorruptAudioError(f"{what} is not a readable audio file (wav, flac, ogg or mp3): {error}") from error


def _decode_blocks(
    sound: sf.SoundFile, channels: int, max_seconds: float | None, sample_rate: int | None, mix: ChannelMix
) -> np.ndarray:
    """Mono samples of ``sound`` at ``sample_rate`` (None: its own), decoded a block at a time; more
    than ``max_seconds`` is refused as soon as one sample past the limit has been read."""
    rate = int(sound.samplerate)
    cap = None if max_seconds is None else int(max_seconds * rate) + 1  # frames: one past the limit
    stream = None
    if sample_rate is not None and sample_rate != rate:
        stream = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ")
    block_frames = max(1, DECODE_BLOCK_SAMPLES // channels)
    parts: list[np.ndarray] = []
    read = 0
    while cap is None or read < cap:
        want = block_frames if cap is None else min(block_frames, cap - read)
        block = sound.read(want, dtype="float32", always_2d=True)  # (frames, channels)
        if not len(block):
            break
        read += len(block)
        mono = _to_mono(block, mix)
        _check_samples(mono)
        parts.append(stream.resample_chunk(mono) if stream is not None else mono.copy())
    if cap is not None and read >= cap:
        raise AudioTooLongError(f"the audio is longer than {max_seconds:.0f} s, the limit")
    if stream is not None and read:
        parts.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


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
