"""Per-stream state of the streaming decoder, as plain data.

:class:`StreamState` is everything one streamed answer carries from block to block; it holds no
locks and no reference to the decoder. Only :class:`~glm4voice.decoder.AudioDecoder` reads and
writes it (under its own locks); :class:`~glm4voice.decoder.DecoderStream` is a handle that pairs a
state with its decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cosyvoice.flow.noise import NoiseSource


@dataclass(eq=False)
class VocoderCarry:
    """What the vocoder side carries from block to block (the original kept these in per-uuid dicts)."""

    generator: torch.Generator
    """Randomness of the vocoder's source (sine phases, noise)."""
    mel_overlap: torch.Tensor | None = None
    """(1, 80, 34): the last block's mel frames that the next block regenerates and cross-fades."""
    cache_mel: torch.Tensor | None = None
    """(1, 80, 1): the last vocoded frame, whose audio was held back."""
    cache_source: torch.Tensor | None = None
    """(1, 1, 256): the source samples of that frame."""
    cache_speech: torch.Tensor | None = None
    """(1, 256): the held-back audio of that frame, as the last block vocoded it."""

    def clear(self) -> None:
        self.mel_overlap = self.cache_mel = self.cache_source = self.cache_speech = None


@dataclass(eq=False)
class StreamState:
    """One streamed answer: codes waiting for a block, the prompt kept for the next block, the carry."""

    seed: int
    prompt_window: int | None
    """Prompt tokens kept as the flow's context (None: all of them, like the original)."""
    noise: NoiseSource
    """The flow's starting noise by absolute mel frame."""
    carry: VocoderCarry
    mel: torch.Tensor
    """(1, 80, F) final mel frames from ``mel_offset`` on (the prompt mel of the next block), on the device."""
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """Decoded tokens from ``token_offset`` on (the prompt tokens of the next block), on the CPU."""
    token_offset: int = 0
    mel_offset: int = 0
    pending: list[int] = field(default_factory=list)
    """Codes fed but not decoded yet (fewer than a block)."""
    tokens_decoded: int = 0
    frames_final: int = 0
    """Mel frames whose audio is final (emitted, or held back only as the vocoder cache frame)."""
    samples_emitted: int = 0
    first_audio_at: float | None = None
    """When the decoder emitted the stream's first audio (``time.perf_counter``): the stream runs dry at
    this time plus its audio so far, unless its next block comes first."""
    finished: bool = False
    busy: bool = False
    """A call is working on this state (set and cleared by the decoder under its lock)."""

    def drop_tensors(self) -> None:
        """Forget everything but the counters (the stream is over)."""
        self.pending = []
        self.carry.clear()
        self.mel = self.tokens = None  # type: ignore[assignment]
