"""HiFT vocoder (``cosyvoice.hifigan.generator.HiFTGenerator`` in config.yaml): mel -> 22.05 kHz speech.

F0 predictor -> harmonic source at sample rate -> STFT of the source; mel -> conv_pre -> [leaky ReLU,
transposed conv upsampling, + downsampled source through a residual block, mean of Snake residual
blocks] x2 -> conv_post -> magnitude exp(·) and phase sin(·) per STFT bin -> iSTFT.

Hand-written: the checkpoint fixes the HiFTNet layout (``conv_pre``, ``ups``, ``source_downs``,
``source_resblocks``, ``resblocks.N.convs1/convs2/activations1/activations2``, ``conv_post``); no
installed library has it or the Snake activation. Weight-normed convolutions are folded at load
(:mod:`cosyvoice.hifigan.weight_norm`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.hifigan.source import Generator, SourceModuleHnNSF
from cosyvoice.hifigan.weight_norm import checkpoint_key_shapes, checkpoint_state_dict, weight_normed

SNAKE_EPS = 1e-9
MAGNITUDE_CLIP = 1e2


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    return int((kernel_size * dilation - dilation) / 2)


def istft(spec: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """``torch.istft(spec, n_fft, hop, n_fft, window)`` (centred, one-sided) without its host-side check
    of the window's overlap-add (a device-to-host sync that a CUDA graph cannot capture): the same
    operations in the same order, so the same bits. spec (B, n_fft/2+1, frames) complex -> (B, samples)."""
    frames = torch.fft.irfft(spec.transpose(1, 2), n=n_fft, dim=-1) * window.view(1, 1, n_fft)  # (B, T, n_fft)
    batch, count = frames.shape[:2]
    length = n_fft + hop * (count - 1)
    y = torch.ops.aten.unfold_backward(frames, [batch, length], 1, n_fft, hop)  # overlap-add
    envelope = torch.ops.aten.unfold_backward(window.pow(2).expand(1, count, n_fft), [1, length], 1, n_fft, hop)
    half = n_fft // 2
    return y[:, half:-half] / envelope[:, half:-half]


class Snake(nn.Module):
    """x + sin²(αx)/α with one α per channel (linear scale, key ``alpha``)."""

    def __init__(
        self, in_features: int, alpha: float = 1.0, alpha_trainable: bool = True, alpha_logscale: bool = False
    ):
        super().__init__()
        del alpha_trainable
        self.alpha_logscale = alpha_logscale
        self.alpha = nn.Parameter(torch.zeros(in_features) if alpha_logscale else torch.ones(in_features) * alpha)

    def _coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, 1/(α+ε)) as (1, C, 1), cached until α changes (saves two kernels per call)."""
        key = (id(self.alpha), self.alpha._version, self.alpha.device, self.alpha.dtype)
        cached = getattr(self, "_cache", None)
        if cached is None or cached[0] != key:
            alpha = self.alpha.detach().unsqueeze(0).unsqueeze(-1)
            if self.alpha_logscale:
                alpha = torch.exp(alpha)
            cached = (key, alpha, 1.0 / (alpha + SNAKE_EPS))
            self._cache = cached
        return cached[1], cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, inverse = self._coefficients()
        return x + inverse * torch.pow(torch.sin(x * alpha), 2)


class ResBlock(nn.Module):
    """Per dilation d: x += conv2(snake(conv1_d(snake(x)))) with weight-normed convolutions."""

    def __init__(self, channels: int = 512, kernel_size: int = 3, dilations: Sequence[int] = (1, 3, 5)):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_normed(
                nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=get_padding(kernel_size, d))
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_normed(
                nn.Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=get_padding(kernel_size, 1))
            )
            for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class HiFTGenerator(nn.Module):
    def __init__(
        self,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 22050,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: Sequence[int] = (8, 8),
        upsample_kernel_sizes: Sequence[int] = (16, 16),
        istft_params: Mapping[str, int] | None = None,
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        source_resblock_kernel_sizes: Sequence[int] = (7, 11),
        source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5)),
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        f0_predictor: nn.Module | None = None,
    ):
        super().__init__()
        if f0_predictor is None:
            raise ValueError("HiFTGenerator needs an f0_predictor")
        istft_params = dict(istft_params or {"n_fft": 16, "hop_len": 4})
        upsample_rates = list(upsample_rates)
        self.out_channels = 1
        self.nb_harmonics = nb_harmonics
        self.sampling_rate = sampling_rate
        self.istft_params = istft_params
        self.n_fft = int(istft_params["n_fft"])
        self.hop_len = int(istft_params["hop_len"])
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.upsample_scale = int(np.prod(upsample_rates)) * self.hop_len
        """Output samples per mel frame (256 for the published decoder)."""
        self.m_source = SourceModuleHnNSF(
            sampling_rate=sampling_rate,
            upsample_scale=self.upsample_scale,
            harmonic_num=nb_harmonics,
            sine_amp=nsf_alpha,
            add_noise_std=nsf_sigma,
            voiced_threshod=nsf_voiced_threshold,
        )
        self.conv_pre = weight_normed(nn.Conv1d(in_channels, base_channels, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            weight_normed(
                nn.ConvTranspose1d(base_channels // 2**i, base_channels // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            )
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes))
        )
        spec_channels = self.n_fft + 2
        down_rates = np.cumprod([1] + upsample_rates[::-1][:-1])[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(down_rates, source_resblock_kernel_sizes, source_resblock_dilation_sizes)):
            width = base_channels // 2 ** (i + 1)
            u = int(u)
            down = (
                nn.Conv1d(spec_channels, width, 1, 1)
                if u == 1
                else nn.Conv1d(spec_channels, width, u * 2, u, padding=u // 2)
            )
            self.source_downs.append(down)
            self.source_resblocks.append(ResBlock(width, k, d))
        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            width = base_channels // 2 ** (i + 1)
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock(width, k, d))
        self.conv_post = weight_normed(nn.Conv1d(width, spec_channels, 7, 1, padding=3))
        self.reflection_pad = nn.ReflectionPad1d((1, 0))
        self.f0_predictor = f0_predictor
        self._window: torch.Tensor | None = None

    # -- checkpoint layout -------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in the published ``hift.pt`` layout (weight-normed convs as weight_g/weight_v)."""
        return checkpoint_state_dict(self)

    def checkpoint_key_shapes(self) -> dict[str, tuple[int, ...]]:
        return checkpoint_key_shapes(self)

    # -- signal processing -------------------------------------------------------------------------
    def stft_window(self, device) -> torch.Tensor:
        """Periodic Hann window of n_fft samples (computed in float64 like scipy's, stored as float32)."""
        window = self._window
        if window is None or window.device != torch.device(device):
            window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).float().to(device)
            self._window = window
        return window

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            x, self.n_fft, self.hop_len, self.n_fft, window=self.stft_window(x.device), return_complex=True
        )
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = torch.clip(magnitude, max=MAGNITUDE_CLIP)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return istft(spec, self.n_fft, self.hop_len, self.stft_window(magnitude.device))

    def draw_randomness(
        self, batch: int, frames: int, generator: Generator | None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's randomness for a forward pass over ``frames`` mel frames (see ``SineGen.draw``)."""
        return self.m_source.l_sin_gen.draw(batch, frames * self.upsample_scale, generator, device)

    def source(
        self,
        mel: torch.Tensor,
        generator: Generator | None = None,
        randomness: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Harmonic excitation (B, 1, T·upsample_scale) from the predicted F0."""
        f0 = self.f0_predictor(mel)  # (B, T)
        batch, frames = f0.shape
        f0 = f0.unsqueeze(-1).expand(batch, frames, self.upsample_scale).reshape(batch, 1, -1)  # nearest upsampling
        return self.m_source(f0, generator, randomness)

    def forward(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: Generator | None = None,
        randomness: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) -> (speech (B, T·256), source (B, 1, T·256)); the first samples of the source are
        replaced by ``cache_source`` (B, 1, n) when given (continuity across streamed blocks). The source's
        randomness comes from ``randomness`` (:meth:`draw_randomness`) if given, else from ``generator``
        (one, or one per row). Free of host synchronisation (it can be captured in a CUDA graph)."""
        s = self.source(mel, generator, randomness)
        if cache_source is not None and cache_source.shape[2]:
            s[:, :, : cache_source.shape[2]] = cache_source
        s_stft = self._stft(s.squeeze(1))

        x = self.conv_pre(mel)
        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, self.lrelu_slope)
            x = self.ups[i](x)
            if i == self.num_upsamples - 1:
                x = self.reflection_pad(x)
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))
        bins = self.n_fft // 2 + 1
        speech = self._istft(torch.exp(x[:, :bins, :]), torch.sin(x[:, bins:, :]))
        return torch.clamp(speech, -self.audio_limit, self.audio_limit), s

    def inference(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: Generator | None = None,
        randomness: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(mel, cache_source, generator, randomness)
