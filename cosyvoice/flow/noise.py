"""Where the flow's ODE starts: noise sources for streamed decoding.

:class:`NoiseTimeline` makes the starting noise a function of (seed, absolute mel frame): every block
of a stream, and the offline decode of the same tokens, see the same noise at the same frame (blocks
re-integrate their prompt frames, and the cross-faded overlap is computed twice). It is generated on
the CPU in fixed chunks, each from its own seeded generator, so the values do not depend on the block
sizes, the device or the order of requests.

:class:`OriginalNoise` reproduces the original's draw instead (the global RNG reseeded with 42 and
``randn`` over the whole block, prompt included), for comparisons with the original implementation.
"""

from __future__ import annotations

from typing import Protocol

import torch

from cosyvoice.flow.flow_matching import original_noise

NOISE_CHUNK_FRAMES = 256
_MASK63 = (1 << 63) - 1


def mix_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for sub-stream ``stream`` of ``seed`` (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + (stream + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


class NoiseSource(Protocol):
    def take(self, start: int, end: int) -> torch.Tensor:
        """Noise (1, channels, end - start) for absolute mel frames [start, end)."""
        ...

    def forget_before(self, frame: int) -> None:
        """Frames before ``frame`` will not be asked for again (drop what is cached for them)."""
        ...


class NoiseTimeline:
    def __init__(self, seed: int, channels: int = 80, chunk_frames: int = NOISE_CHUNK_FRAMES):
        self.seed = seed
        self.channels = channels
        self.chunk_frames = chunk_frames
        self._chunks: dict[int, torch.Tensor] = {}

    def _chunk(self, index: int) -> torch.Tensor:
        chunk = self._chunks.get(index)
        if chunk is None:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, index))
            chunk = torch.randn(self.channels, self.chunk_frames, generator=generator)
            self._chunks[index] = chunk
        return chunk

    def take(self, start: int, end: int) -> torch.Tensor:
        if start < 0 or end < start:
            raise ValueError(f"bad frame range [{start}, {end})")
        size = self.chunk_frames
        pieces = []
        for index in range(start // size, (end + size - 1) // size):
            lo, hi = max(start, index * size), min(end, (index + 1) * size)
            pieces.append(self._chunk(index)[:, lo - index * size : hi - index * size])
        out = torch.cat(pieces, dim=1) if pieces else torch.zeros(self.channels, 0)
        return out.unsqueeze(0)

    def forget_before(self, frame: int) -> None:
        """Drop cached chunks that lie wholly before ``frame`` (they are regenerated if asked again)."""
        for index in [i for i in self._chunks if (i + 1) * self.chunk_frames <= frame]:
            del self._chunks[index]


class OriginalNoise:
    """The original's noise: ``torch.manual_seed(42); randn(1, channels, frames)`` for every block."""

    def __init__(self, channels: int = 80):
        self.channels = channels

    def take(self, start: int, end: int) -> torch.Tensor:
        return original_noise((1, self.channels, end - start))

    def forget_before(self, frame: int) -> None:
        pass
