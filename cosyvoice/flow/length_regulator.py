"""Token rate -> mel rate: nearest-neighbour stretch, then a small conv stack (torch building blocks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.transformer.encoder import padding_mask


class InterpolateRegulator(nn.Module):
    """``model`` = [Conv1d(k3), GroupNorm, Mish] per sampling ratio, then Conv1d(k1) (keys model.{0,1,3,4,...})."""

    def __init__(self, channels: int, sampling_ratios: Sequence[int], out_channels: int | None = None, groups: int = 1):
        super().__init__()
        self.sampling_ratios = tuple(sampling_ratios)
        out_channels = out_channels or channels
        layers: list[nn.Module] = []
        for _ in self.sampling_ratios:
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, out_channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(
        self, x: torch.Tensor, ylens: torch.Tensor, max_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T_tok, C) -> (B, T_mel, C) with T_mel = ``max_len`` (default: ``ylens.max()``, a host sync)."""
        length = int(ylens.max()) if max_len is None else max_len
        mask = padding_mask(ylens, length).to(x.dtype).unsqueeze(-1)
        stretched = F.interpolate(x.transpose(1, 2).contiguous(), size=length, mode="nearest")
        return self.model(stretched).transpose(1, 2).contiguous() * mask, ylens
