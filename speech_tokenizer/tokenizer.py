"""``SpeechTokenizer``: speech in any form -> GLM-4-Voice audio code ids (12.5 per second).

    tokenizer = SpeechTokenizer.from_pretrained("THUDM/glm-4-voice-tokenizer", device="cuda")
    codes = tokenizer.tokenize("question.wav")             # list[int], each in [0, 16384)
    codes = tokenizer.tokenize(samples, source_rate=44100) # numpy / torch array
    batch = tokenizer.tokenize_batch([wav_bytes, ("x.flac")])

Input is anything :func:`glm4voice.audio.load_audio` takes (path, encoded bytes, array with
``source_rate``, ``(array, rate)`` tuple) or a :class:`glm4voice.audio.Audio`. Multi-channel audio
is AVERAGED to mono here (``load_audio``'s rule; the compatible ``extract_speech_token`` uses the
first channel, as the original). Non-16 kHz audio is resampled with soxr. Bad input raises a
:class:`glm4voice.audio.AudioError` with a message meant for the person who gave it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glm4voice.audio import (
    DEFAULT_MAX_INPUT_SECONDS,
    INPUT_SAMPLE_RATE,
    SPEECH_TOKEN_RATE,
    Audio,
    AudioSource,
    load_audio,
)
from glm4voice.devices import high_priority_stream
from glm4voice.memory import MemoryOwners, tensor_bytes
from speech_tokenizer.modeling_whisper import WhisperVQEncoder
from speech_tokenizer.pipeline import DEFAULT_BATCH_SIZE, check_feature_extractor, samples_per_token, tokenize_waveforms

logger = logging.getLogger(__name__)

SpeechInput = AudioSource | Audio


@dataclass(frozen=True)
class TokenizerOptions:
    batch_size: int = DEFAULT_BATCH_SIZE
    """30 s pieces per encoder run (memory bound; does not change the codes)."""
    max_seconds: float | None = DEFAULT_MAX_INPUT_SECONDS
    """Longest accepted input per utterance (None: no limit)."""


class SpeechTokenizer:
    """A loaded speech tokenizer (model + feature extractor) on one device."""

    token_rate = SPEECH_TOKEN_RATE

    def __init__(self, model: WhisperVQEncoder, feature_extractor, options: TokenizerOptions = TokenizerOptions()):
        check_feature_extractor(model, feature_extractor)
        if options.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {options.batch_size}")
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.options = options
        self._cuda_stream = None
        if self.model.device.type == "cuda":
            # its own stream, of the highest priority: in a process that also decodes speech or runs the
            # LLM engine, a new question's tokens do not wait behind their queued work
            torch.cuda.synchronize(self.model.device)
            self._cuda_stream = high_priority_stream(self.model.device)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        options: TokenizerOptions = TokenizerOptions(),
    ) -> SpeechTokenizer:
        """Load a ``glm-4-voice-tokenizer`` folder or hub id.

        ``device``: None picks CUDA when available, else CPU. ``dtype``: the encoder's dtype
        (float32 by default, as the original; lower precision is faster on a GPU but flips some
        codes, see docs/perf/speech_tokenizer.md). The nearest-code search always runs in float32.
        """
        from transformers import WhisperFeatureExtractor

        from glm4voice.devices import default_device
        from glm4voice.hub import resolve_checkpoint
        from speech_tokenizer.checkpoint import CHECKPOINT_FILES, WEIGHTS_PATTERN

        folder = resolve_checkpoint(path_or_hub_id, allow_patterns=list(CHECKPOINT_FILES) + [WEIGHTS_PATTERN])
        if device is None:
            device = default_device()
        model = WhisperVQEncoder.from_pretrained(folder, device=device, dtype=dtype)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(folder))
        logger.info("speech tokenizer loaded from %s on %s (%s)", folder, model.device, dtype)
        return cls(model, feature_extractor, options)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def cuda_stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream tokenizing runs on (the device's highest priority; None on a CPU)."""
        return self._cuda_stream

    def memory_owners(self) -> MemoryOwners:
        """What the tokenizer holds on its device (see :mod:`glm4voice.memory`): the encoder's weights
        and the stream it runs on."""
        return MemoryOwners(
            parts={"speech tokenizer weights": tensor_bytes(self.model)},
            streams={"speech tokenizer": self._cuda_stream},
        )

    @property
    def samples_per_token(self) -> int:
        """16 kHz input samples per code (1280)."""
        return samples_per_token(self.model, self.feature_extractor)

    @property
    def num_codes(self) -> int:
        return self.model.config.codebook_size

    def tokenize(self, audio: SpeechInput, *, source_rate: int | None = None) -> list[int]:
        """Code ids of one utterance (ceil(duration * 12.5) of them)."""
        return self.tokenize_batch([audio], source_rate=source_rate)[0]

    def tokenize_batch(self, audios: Sequence[SpeechInput], *, source_rate: int | None = None) -> list[list[int]]:
        """Code ids of several utterances, encoded together; equal to tokenizing each alone."""
        if isinstance(audios, (str, bytes, bytearray, np.ndarray, Audio, tuple)):
            raise TypeError("tokenize_batch takes a list of inputs; use tokenize() for one")
        waveforms = [self._waveform(audio, source_rate) for audio in audios]
        if self._cuda_stream is None:
            return tokenize_waveforms(self.model, self.feature_extractor, waveforms, batch_size=self.options.batch_size)
        self._cuda_stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(self._cuda_stream):  # the codes are copied to the host inside: synchronised
            return tokenize_waveforms(self.model, self.feature_extractor, waveforms, batch_size=self.options.batch_size)

    def _waveform(self, audio: SpeechInput, source_rate: int | None) -> np.ndarray:
        if isinstance(audio, Audio):
            audio = (audio.samples, audio.sample_rate)
        loaded = load_audio(audio, INPUT_SAMPLE_RATE, source_rate=source_rate, max_seconds=self.options.max_seconds)
        return loaded.samples
