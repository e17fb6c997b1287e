"""The flow-matching estimator: a 1-D U-Net of ResNet blocks and transformer blocks
(``cosyvoice.flow.decoder.ConditionalDecoder`` in config.yaml, Matcha-TTS layout).

diffusers supplies the transformer blocks (``BasicTransformerBlock``: ``norm1``, ``attn1.to_q/k/v/out.0``,
``norm3``, ``ff.net.0.proj``, ``ff.net.2``), the time MLP (``TimestepEmbedding``: ``linear_1``,
``linear_2``) and the down/up-sampling convolutions (``Downsample1D``/``Upsample1D``: ``conv``); their
parameter names and math are those of the checkpoint.

Masks. The original passes the float 0/1 frame mask as an *additive* attention mask (so attention is
effectively unmasked; the checkpoint was trained that way) and normalises over all frames. With one
unpadded sequence that equals plain attention and ``GroupNorm``, which is what ``padded=False`` (the
default) computes. ``padded=True`` is for inputs padded past their valid frames (fixed-shape CUDA
graphs, batches of streams): padding is then excluded from attention keys and from the GroupNorm
statistics, so every valid frame gets the same result as the unpadded computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.downsampling import Downsample1D
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.upsampling import Upsample1D
from torch import nn

TIME_SCALE = 1000.0
GROUPNORM_GROUPS = 8
GROUPNORM_EPS = 1e-5


class SinusoidalPosEmb(nn.Module):
    """Time embedding [sin(1000·t·f_k), cos(1000·t·f_k)], f_k = exp(-k·ln(1e4)/(half-1)).

    Hand-written: diffusers' ``get_timestep_embedding`` has the same formula but another float
    evaluation order; with arguments up to 1000 rad that moves the embedding by ~1e-4.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError("SinusoidalPosEmb needs an even dimension")
        self.dim = dim

    def forward(self, t: torch.Tensor, scale: float = TIME_SCALE) -> torch.Tensor:
        if t.ndim < 1:
            t = t.unsqueeze(0)
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        frequencies = torch.exp(torch.arange(half, device=t.device).float() * -step)
        angles = scale * t.unsqueeze(1) * frequencies.unsqueeze(0)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


def masked_group_norm(x: torch.Tensor, mask: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of x (B, C, T) whose statistics count only frames where mask (B, 1, T) is 1.

    Hand-written: torch's GroupNorm has no mask; this makes padded frames invisible to valid ones.
    """
    batch, channels, length = x.shape
    groups = norm.num_groups
    xf = x.float().view(batch, groups, channels // groups, length)
    m = mask.float().view(batch, 1, 1, length)
    count = m.sum(dim=(2, 3), keepdim=True) * (channels // groups)
    mean = (xf * m).sum(dim=(2, 3), keepdim=True) / count
    var = (((xf - mean) * m) ** 2).sum(dim=(2, 3), keepdim=True) / count
    normed = ((xf - mean) * torch.rsqrt(var + norm.eps)).view(batch, channels, length)
    return (normed * norm.weight.float().view(1, -1, 1) + norm.bias.float().view(1, -1, 1)).to(x.dtype)


class Block1D(nn.Module):
    """conv(k3) -> GroupNorm(8) -> Mish on masked input, masked output (keys block.0, block.1)."""

    def __init__(self, dim: int, dim_out: int, groups: int = GROUPNORM_GROUPS):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor, padded: bool = False) -> torch.Tensor:
        conv, norm, act = self.block
        h = conv(x * mask)
        h = masked_group_norm(h, mask, norm) if padded else norm(h)
        return act(h) * mask


class ResnetBlock1D(nn.Module):
    """block1 -> + mlp(time) -> block2, plus a 1x1 residual conv (keys mlp.1, block1, block2, res_conv)."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = GROUPNORM_GROUPS):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out, groups)
        self.block2 = Block1D(dim_out, dim_out, groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor, padded: bool = False) -> torch.Tensor:
        h = self.block1(x, mask, padded) + self.mlp(time_emb).unsqueeze(-1)
        h = self.block2(h, mask, padded)
        return h + self.res_conv(x * mask)


def _transformer_stack(dim: int, count: int, heads: int, head_dim: int, dropout: float, act_fn: str) -> nn.ModuleList:
    return nn.ModuleList(
        BasicTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim, dropout=dropout, activation_fn=act_fn)
        for _ in range(count)
    )


class ConditionalDecoder(nn.Module):
    """U-Net estimator v(x, mask, mu, t, spks, cond) of the flow's velocity field.

    Input channels: x (noisy mel) ‖ mu (encoder output at mel rate) ‖ spks (repeated over time) ‖ cond
    (prompt mel, zero elsewhere). Down blocks at T and T/2, mid blocks at T/2, up blocks back to T.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (256, 256),
        dropout: float = 0.05,
        attention_head_dim: int = 64,
        n_blocks: int = 1,
        num_mid_blocks: int = 2,
        num_heads: int = 4,
        act_fn: str = "snake",
    ):
        super().__init__()
        channels = tuple(channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        time_embed_dim = channels[0] * 4
        self.time_embeddings = SinusoidalPosEmb(in_channels)
        self.time_mlp = TimestepEmbedding(in_channels=in_channels, time_embed_dim=time_embed_dim, act_fn="silu")

        def stack(dim: int) -> nn.ModuleList:
            return _transformer_stack(dim, n_blocks, num_heads, attention_head_dim, dropout, act_fn)

        self.down_blocks = nn.ModuleList()
        output_channel = in_channels
        for i, width in enumerate(channels):
            input_channel, output_channel = output_channel, width
            is_last = i == len(channels) - 1
            downsample = nn.Conv1d(width, width, 3, padding=1) if is_last else Downsample1D(width, use_conv=True)
            self.down_blocks.append(
                nn.ModuleList([ResnetBlock1D(input_channel, width, time_embed_dim), stack(width), downsample])
            )
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(channels[-1], output_channel, time_embed_dim), stack(output_channel)])
            for _ in range(num_mid_blocks)
        )
        up_channels = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_channels) - 1):
            width = up_channels[i + 1]
            is_last = i == len(up_channels) - 2
            upsample = nn.Conv1d(width, width, 3, padding=1) if is_last else Upsample1D(width, use_conv_transpose=True)
            self.up_blocks.append(
                nn.ModuleList([ResnetBlock1D(up_channels[i] * 2, width, time_embed_dim), stack(width), upsample])
            )
        self.final_block = Block1D(up_channels[-1], up_channels[-1])
        self.final_proj = nn.Conv1d(up_channels[-1], out_channels, 1)

    @staticmethod
    def _attend(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor, padded: bool) -> torch.Tensor:
        # padded: exclude padding keys (bool key mask); unpadded: the original's all-ones additive mask
        # is a constant shift of the logits, i.e. no mask at all.
        key_mask = (mask > 0) if padded else None  # (B, 1, T)
        x = x.transpose(1, 2).contiguous()
        for block in blocks:
            x = block(hidden_states=x, attention_mask=key_mask)
        return x.transpose(1, 2).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        padded: bool = False,
    ) -> torch.Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T) float 0/1; t scalar or (B,); spks (B, 80) -> (B, 80, T)."""
        t = self.time_mlp(self.time_embeddings(t))
        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if cond is not None:
            parts.append(cond)
        x = torch.cat(parts, dim=1)

        hiddens = []
        masks = [mask]
        for resnet, transformers, downsample in self.down_blocks:
            mask_down = masks[-1]
            x = resnet(x, mask_down, t, padded)
            x = self._attend(transformers, x, mask_down, padded)
            hiddens.append(x)
            x = downsample(x * mask_down)
            masks.append(mask_down[:, :, ::2])
        masks = masks[:-1]
        mask_mid = masks[-1]
        for resnet, transformers in self.mid_blocks:
            x = resnet(x, mask_mid, t, padded)
            x = self._attend(transformers, x, mask_mid, padded)
        for resnet, transformers, upsample in self.up_blocks:
            mask_up = masks.pop()
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = resnet(x, mask_up, t, padded)
            x = self._attend(transformers, x, mask_up, padded)
            x = upsample(x * mask_up)
        x = self.final_block(x, mask_up, padded)
        return self.final_proj(x * mask_up) * mask
