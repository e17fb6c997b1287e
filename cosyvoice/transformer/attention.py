"""Multi-head self-attention with Transformer-XL relative positions and an optional block-causal mask.

Hand-written: the checkpoint fixes the ESPnet key names (``linear_q/k/v/out``, ``linear_pos``,
``pos_bias_u/v``) and the block-causal "grid" mask of the flow encoder, which no maintained library
module offers (transformers' Wav2Vec2-Conformer attention has the same names but no block mask and an
internal, unstable API).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def block_causal_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """(length, length) bool: query i sees key j iff j lies before the end of i's block.

    Blocks of ``block_size`` positions count from position 0; this equals "j <= i or j in the same
    block" (the checkpoint's grid mask with the triangle filled).
    """
    positions = torch.arange(length, device=device)
    block_end = (positions // block_size + 1) * block_size
    return positions.unsqueeze(0) < block_end.unsqueeze(1)


def shift_relative(scores: torch.Tensor) -> torch.Tensor:
    """(..., T, 2T-1) scores against relative positions T-1 ... -(T-1) -> (..., T, T) with entry
    (i, j) taken at relative position i - j (column T-1-i+j)."""
    length = scores.size(-2)
    if scores.size(-1) != 2 * length - 1:
        raise ValueError(f"expected {2 * length - 1} relative positions for length {length}, got {scores.size(-1)}")
    scores = scores.contiguous()
    *lead, _, width = scores.shape
    lead_strides = scores.stride()[:-2]
    return scores.as_strided(
        (*lead, length, length), (*lead_strides, width - 1, 1), scores.storage_offset() + length - 1
    )


class RelPositionMultiHeadedAttention(nn.Module):
    """Self-attention with scores ((q + u)·k + shift((q + v)·p)) / sqrt(d_k).

    ``block_size`` set: keys are further limited to :func:`block_causal_mask` (the
    ``block_rel_selfattn`` layer of the published config).
    """

    def __init__(
        self, n_head: int, n_feat: int, dropout_rate: float = 0.0, key_bias: bool = True, block_size: int | None = None
    ):
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"n_feat={n_feat} is not a multiple of n_head={n_head}")
        del dropout_rate  # inference only
        self.h = n_head
        self.d_k = n_feat // n_head
        self.block_size = block_size
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1, self.h, self.d_k)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); key_mask (B, 1, T) bool (False = padding); pos_emb (1, 2T-1, D)."""
        batch, length, _ = x.shape
        q = self._heads(self.linear_q(x))  # (B, T, H, d_k)
        k = self._heads(self.linear_k(x)).transpose(1, 2)
        v = self._heads(self.linear_v(x)).transpose(1, 2)
        p = self._heads(self.linear_pos(pos_emb)).transpose(1, 2)  # (1, H, 2T-1, d_k)
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = shift_relative(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))
        scores = (content + position) / math.sqrt(self.d_k)  # (B, H, T, T)
        allowed = key_mask  # (B, 1, T) -> broadcast over queries
        if self.block_size is not None:
            allowed = allowed & block_causal_mask(length, self.block_size, device=x.device)
        blocked = ~allowed.unsqueeze(1)  # (B, 1, T or 1, T)
        weights = torch.softmax(scores.masked_fill(blocked, -float("inf")), dim=-1).masked_fill(blocked, 0.0)
        context = torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, self.h * self.d_k)
        return self.linear_out(context)


class BlockRelPositionMultiHeadedAttention(RelPositionMultiHeadedAttention):
    """The published config's ``block_rel_selfattn``: relative positions and a block-causal mask."""

    def __init__(
        self, n_head: int, n_feat: int, dropout_rate: float = 0.0, key_bias: bool = True, block_size: int = 25
    ):
        super().__init__(n_head, n_feat, dropout_rate, key_bias, block_size=block_size)
