"""Input layer and relative positional encoding of the flow's Conformer encoder.

Hand-written: the checkpoint fixes the ESPnet layout (``embed.out.{0,1}``) and the ESPnet
"rel_pos_espnet" table (sin/cos interleaved, relative positions T-1 ... -(T-1)); no maintained
library exposes this exact table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

REL_POS_BASE = 10_000.0


def relative_position_table(length: int, d_model: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 2*length-1, d_model) encodings of relative positions length-1, ..., 0, ..., -(length-1).

    Even channels hold sin(r * f_k), odd channels cos(r * f_k) with f_k = 10000^(-2k/d_model),
    computed in float32 in the same order as the checkpoint's training code.
    """
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    frequencies = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(REL_POS_BASE) / d_model))
    positive = torch.zeros(length, d_model)
    negative = torch.zeros(length, d_model)
    positive[:, 0::2] = torch.sin(position * frequencies)
    positive[:, 1::2] = torch.cos(position * frequencies)
    negative[:, 0::2] = torch.sin(-1 * position * frequencies)
    negative[:, 1::2] = torch.cos(-1 * position * frequencies)
    table = torch.cat([torch.flip(positive, [0]), negative[1:]], dim=0)
    return table.unsqueeze(0).to(device=device, dtype=dtype)


class EspnetRelPositionalEncoding(nn.Module):
    """Scales the input by sqrt(d_model) and returns the relative position table for its length.

    The table is a cache (not a buffer: the checkpoint has no key for it), rebuilt when a longer
    input, another device or dtype comes.
    """

    def __init__(self, d_model: int, dropout_rate: float = 0.0, max_len: int = 5000):
        super().__init__()
        del dropout_rate  # inference only
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.max_len = max_len
        self._table: torch.Tensor | None = None

    def position_encoding(self, size: int, device, dtype) -> torch.Tensor:
        """(1, 2*size-1, d_model) slice of the table centred on relative position 0."""
        table = self._table
        if (
            table is None
            or table.size(1) < 2 * size - 1
            or table.device != torch.device(device)
            or table.dtype != dtype
        ):
            length = max(size, self.max_len if table is None else (table.size(1) + 1) // 2)
            table = relative_position_table(length, self.d_model, device=device, dtype=dtype)
            self._table = table
        center = table.size(1) // 2
        return table[:, center - size + 1 : center + size]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.xscale, self.position_encoding(x.size(1), x.device, x.dtype)


class LinearNoSubsampling(nn.Module):
    """Linear + LayerNorm input layer (``embed.out.0``, ``embed.out.1``), then the positional encoding."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc_class: nn.Module):
        super().__init__()
        del dropout_rate  # inference only
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.pos_enc = pos_enc_class

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pos_enc(self.out(x))
