"""Token rate -> mel rate: nearest-neighbour stretch, then a small conv stack (torch building blocks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.flow.decoder import masked_group_norm
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

    def forward_rows(
        self, x: torch.Tensor, token_lens: torch.Tensor, feat_lens: torch.Tensor, frames: int
    ) -> torch.Tensor:
        """Rows of different lengths at once: x (B, T_tok, C) right-padded, row i's first ``token_lens[i]``
        tokens stretched to ``feat_lens[i]`` frames -> (B, frames, C), each row what :meth:`forward` gives
        it alone, zero after its frames (up to float rounding: the GroupNorm statistics are summed over
        each row's own frames). ``token_lens``, ``feat_lens``: (B,) integer tensors on x's device; no host
        synchronisation (CUDA graphs can capture it)."""
        # torch's nearest interpolation to `size`: source = min(floor(dst * float32(in / out)), in - 1)
        scale = token_lens.float() / feat_lens.clamp(min=1).float()  # (B,); a row of no frames stays finite
        positions = torch.arange(frames, device=x.device, dtype=torch.float32)
        source = torch.floor(positions.unsqueeze(0) * scale.unsqueeze(1)).long()  # (B, frames)
        source = torch.minimum(source, (token_lens.long() - 1).clamp(min=0).unsqueeze(1))
        stretched = torch.gather(x, 1, source.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # (B, frames, C)
        mask = padding_mask(feat_lens, frames).to(x.dtype).unsqueeze(1)  # (B, 1, frames)
        h = stretched.transpose(1, 2) * mask  # (B, C, frames)
        for layer in self.model:
            if isinstance(layer, nn.Conv1d):
                h = layer(h * mask)  # a padded frame reads as the zero padding of the row alone
            elif isinstance(layer, nn.GroupNorm):
                h = masked_group_norm(h, mask, layer)
            else:
                h = layer(h)
        return (h * mask).transpose(1, 2).contiguous()
