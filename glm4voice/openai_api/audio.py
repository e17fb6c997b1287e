"""Audio of the OpenAI-compatible API: base64 pcm16 at 24 kHz, and whole answers as files.

Audio leaves the server as 16-bit PCM at 24 kHz (OpenAI's rate): the session resamples the decoder's
22.05 kHz output with a streaming resampler (:class:`glm4voice.conversation.StreamResampler`), so the
chunks of a stream join without seams and equal the whole answer resampled at once.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import soundfile as sf

from glm4voice.audio import PCM_DTYPE, PCM_SCALE, to_pcm16

API_SAMPLE_RATE = 24_000
"""Rate of the pcm16 audio the API sends and the realtime endpoint receives."""

FILE_FORMATS = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
}
"""Whole-answer formats (soundfile container, subtype)."""
PCM16 = "pcm16"
OUTPUT_FORMATS = (*FILE_FORMATS, PCM16)
INPUT_FORMATS = ("wav", "mp3")


def pcm16_base64(samples: np.ndarray) -> str:
    return base64.b64encode(to_pcm16(samples).tobytes()).decode("ascii")


def encode_answer(pcm: np.ndarray, sample_rate: int, format: str) -> bytes:
    """A whole answer (int16 samples) in ``format`` (one of OUTPUT_FORMATS)."""
    if format == PCM16:
        return np.asarray(pcm, dtype=PCM_DTYPE).tobytes()
    container, subtype, _ = FILE_FORMATS[format]
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(pcm, dtype=np.int16), sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def decode_base64(data: str) -> bytes:
    """Strict base64 (the standard alphabet, padding required); ValueError with a reason."""
    if not isinstance(data, str):
        raise ValueError("expected a base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"not valid base64 ({error})") from error


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian 16-bit PCM bytes to float32 in [-1, 1]."""
    if len(data) % PCM_DTYPE.itemsize:
        raise ValueError(f"pcm16 audio has an even number of bytes (got {len(data)})")
    return np.frombuffer(data, dtype=PCM_DTYPE).astype(np.float32) / PCM_SCALE
