"""Neural source filter excitation of HiFT: harmonic sines of the predicted F0 plus noise, merged by a
linear layer (``m_source.l_linear``) and tanh.

Hand-written: the checkpoint fixes ``l_linear`` and the NSF recipe (9 harmonics, amplitude 0.1, voiced
threshold 10 Hz). Randomness (per-harmonic start phase, additive noise) is drawn from an explicit
``torch.Generator`` in the original's order (phases by ``rand``, then noise by ``randn``), so the same
generator state reproduces the original's draw from a freshly seeded global RNG. It can also be drawn
beforehand (:meth:`SineGen.draw`) and passed in, which keeps the forward pass free of generator calls
(a CUDA graph replays it with new randomness in static buffers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

import torch
from torch import nn

Generator: TypeAlias = torch.Generator | Sequence[torch.Generator]
"""One generator for a whole batch, or one per row."""


class SineGen(nn.Module):
    """f0 (B, 1, N) in Hz -> (B, harmonics, N) sines (zero where unvoiced) plus noise."""

    def __init__(
        self,
        samp_rate: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        noise_std: float = 0.003,
        voiced_threshold: float = 0,
    ):
        super().__init__()
        self.sampling_rate = samp_rate
        self.harmonic_num = harmonic_num
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold

    def draw(
        self, batch: int, samples: int, generator: Generator | None = None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The randomness of a forward pass over (batch, samples): (uniform (B, H, 1) start phases in
        [0, 1) on the generator's device, normal (B, H, samples) noise on ``device``), drawn in the
        original's order. ``generator``: one for the whole batch, or one per row (each row then draws
        exactly what it would draw alone with its generator, so batching streams does not change their
        audio)."""
        harmonics = self.harmonic_num + 1
        if isinstance(generator, Sequence):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for a batch of {batch}")
            uniform = torch.cat(
                [torch.rand((1, harmonics, 1), generator=g, device=_gen_device(g)).to(device) for g in generator]
            )
            normal = torch.cat([torch.randn((1, harmonics, samples), generator=g, device=device) for g in generator])
        else:
            uniform = torch.rand((batch, harmonics, 1), generator=generator, device=_gen_device(generator))
            normal = torch.randn((batch, harmonics, samples), generator=generator, device=device)
        return uniform, normal

    def forward(
        self,
        f0: torch.Tensor,
        generator: Generator | None = None,
        randomness: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """f0 (B, 1, N) -> (B, H, N); the randomness is ``randomness`` (from :meth:`draw`) if given, else
        drawn from ``generator`` (see :meth:`draw`)."""
        if randomness is None:
            randomness = self.draw(f0.shape[0], f0.shape[-1], generator, f0.device)
        uniform, normal = randomness
        harmonics = torch.arange(1, self.harmonic_num + 2, device=f0.device, dtype=torch.float32).view(1, -1, 1)
        cycles = f0.float() * harmonics / self.sampling_rate  # (B, H, N), cycles per sample
        theta = 2 * math.pi * (torch.cumsum(cycles, dim=-1) % 1)
        # start phase ~ U(-pi, pi) per harmonic (computed like torch.distributions.Uniform), 0 for the fundamental
        low = torch.tensor(-math.pi)
        width = torch.tensor(math.pi) - low
        phase = (low + uniform * width).to(f0.device)
        phase[:, 0, :] = 0
        sines = self.sine_amp * torch.sin(theta + phase)
        voiced = (f0 > self.voiced_threshold).float()
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        return sines * voiced + noise_amp * normal


def _gen_device(generator: torch.Generator | None) -> torch.device:
    # the original drew the phases on the CPU; a given generator decides its own device
    return generator.device if generator is not None else torch.device("cpu")


class SourceModuleHnNSF(nn.Module):
    """tanh(l_linear(sines)): one excitation channel (B, 1, N) from the harmonic sines."""

    def __init__(
        self,
        sampling_rate: int,
        upsample_scale: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        add_noise_std: float = 0.003,
        voiced_threshod: float = 0,
    ):
        super().__init__()
        del upsample_scale
        self.sine_amp = sine_amp
        self.noise_std = add_noise_std
        self.l_sin_gen = SineGen(sampling_rate, harmonic_num, sine_amp, add_noise_std, voiced_threshod)
        self.l_linear = nn.Linear(harmonic_num + 1, 1)
        self.l_tanh = nn.Tanh()

    def forward(
        self,
        f0: torch.Tensor,
        generator: Generator | None = None,
        randomness: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """f0 (B, 1, N) at sample rate -> excitation (B, 1, N); ``generator``, ``randomness``: see :class:`SineGen`."""
        sines = self.l_sin_gen(f0, generator, randomness).transpose(1, 2)  # (B, N, H)
        return self.l_tanh(self.l_linear(sines.to(self.l_linear.weight.dtype))).transpose(1, 2)
