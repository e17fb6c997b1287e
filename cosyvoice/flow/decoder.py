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
statistics, so every valid frame gets the same result as the unpadded computation. ``mask=None``
means "every frame valid" and skips the multiplications by an all-ones mask (bit-identical).

Speed (the ODE runs this 10 times per block; it is launch-bound): the transformer blocks run through
:func:`transformer_block`, our forward over the diffusers modules' own parameters, with one GEMM for
q/k/v (weights concatenated once and cached) instead of diffusers' generic forward, which inspects the
processor's signature and divides by a rescale factor of 1 on every call; the time conditioning of all
ResNet blocks (:meth:`ConditionalDecoder.time_conditioning`) can be computed once per time step
outside the loop (it depends only on t).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TypeAlias, cast

import torch
import torch.nn.functional as F
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


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _fused_qkv_weight(attn) -> torch.Tensor:
    """[to_q; to_k; to_v] weights as one matrix, cached on the module until any of them changes."""
    cached = getattr(attn, "_fused_qkv_cache", None)
    if cached is not None and torch.compiler.is_compiling():
        return cached[1]  # traced by torch.compile: the cache was filled by an eager call
    weights = (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)
    key = tuple((id(w), w._version, w.device, w.dtype) for w in weights)
    if cached is None or cached[0] != key:
        cached = (key, torch.cat([w.detach() for w in weights], dim=0))
        attn._fused_qkv_cache = cached
    return cached[1]


def transformer_block(block: BasicTransformerBlock, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """diffusers' BasicTransformerBlock (layer_norm, self-attention only, no bias on q/k/v) at inference:
    x += attn(norm1(x)); x += ff(norm3(x)). ``key_mask`` (B, 1, T) bool hides padding keys."""
    attn = block.attn1
    h = block.norm1(x)
    batch, length, _ = h.shape
    qkv = F.linear(h, _fused_qkv_weight(attn))
    inner = qkv.shape[-1] // 3
    heads = attn.heads
    q, k, v = (qkv[..., i * inner : (i + 1) * inner].view(batch, length, heads, -1).transpose(1, 2) for i in range(3))
    mask = None if key_mask is None else key_mask.unsqueeze(1)  # (B, 1, 1, T)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    context = context.transpose(1, 2).reshape(batch, length, inner)
    x = attn.to_out[0](context) + x
    return block.ff(block.norm3(x)) + x


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, padded: bool = False) -> torch.Tensor:
        conv, norm, act = self.block
        h = conv(_masked(x, mask))
        if padded:
            if mask is None:
                raise ValueError("padded=True needs the frame mask")
            h = masked_group_norm(h, mask, cast(nn.GroupNorm, norm))
        else:
            h = norm(h)
        return _masked(act(h), mask)


class ResnetBlock1D(nn.Module):
    """block1 -> + mlp(time) -> block2, plus a 1x1 residual conv (keys mlp.1, block1, block2, res_conv)."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = GROUPNORM_GROUPS):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out, groups)
        self.block2 = Block1D(dim_out, dim_out, groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, time_proj: torch.Tensor, padded: bool = False
    ) -> torch.Tensor:
        """``time_proj`` = ``self.mlp(time embedding)``, (B or 1, dim_out)."""
        h = self.block1(x, mask, padded) + time_proj.unsqueeze(-1)
        h = self.block2(h, mask, padded)
        return h + self.res_conv(_masked(x, mask))


def _transformer_stack(dim: int, count: int, heads: int, head_dim: int, dropout: float, act_fn: str) -> nn.ModuleList:
    return nn.ModuleList(
        BasicTransformerBlock(
            dim=dim, num_attention_heads=heads, attention_head_dim=head_dim, dropout=dropout, activation_fn=act_fn
        )
        for _ in range(count)
    )


# What iterating the block lists yields (each stage is an nn.ModuleList of these modules)
_Stages: TypeAlias = Iterable[tuple[ResnetBlock1D, nn.ModuleList, nn.Module]]
_MidStages: TypeAlias = Iterable[tuple[ResnetBlock1D, nn.ModuleList]]


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

    def resnets(self) -> list[ResnetBlock1D]:
        """The ResNet blocks in the order forward() uses them."""
        return [blocks[0] for blocks in (*self.down_blocks, *self.mid_blocks, *self.up_blocks)]

    def time_conditioning(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each ResNet block's projection of the time embedding of t (the only use of t)."""
        weight = self.time_mlp.linear_1.weight
        emb = self.time_mlp(self.time_embeddings(t).to(weight.dtype))
        return tuple(resnet.mlp(emb) for resnet in self.resnets())

    @staticmethod
    def _attend(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None, padded: bool) -> torch.Tensor:
        # padded: exclude padding keys (bool key mask); unpadded: the original's all-ones additive mask
        # is a constant shift of the logits, i.e. no mask at all.
        key_mask = (mask > 0) if padded and mask is not None else None  # (B, 1, T)
        x = x.transpose(1, 2).contiguous()
        for block in blocks:
            x = transformer_block(block, x, key_mask)
        return x.transpose(1, 2).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        mu: torch.Tensor,
        t: torch.Tensor | None,
        spks: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        padded: bool = False,
        time_cond: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """x, mu, cond (B, 80, T); mask (B, 1, T) float 0/1 or None (all frames valid); t scalar or (B,)
        (or ``time_cond`` from :meth:`time_conditioning`); spks (B, 80) -> (B, 80, T)."""
        if padded and mask is None:
            raise ValueError("padded=True needs the frame mask")
        if time_cond is None:
            if t is None:
                raise ValueError("forward needs t or its time_cond")
            time_cond = self.time_conditioning(t)
        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if cond is not None:
            parts.append(cond)
        x = torch.cat(parts, dim=1)

        times = iter(time_cond)
        hiddens = []
        masks = [mask]
        for resnet, transformers, downsample in cast(_Stages, self.down_blocks):
            mask_down = masks[-1]
            x = resnet(x, mask_down, next(times), padded)
            x = self._attend(transformers, x, mask_down, padded)
            hiddens.append(x)
            x = downsample(_masked(x, mask_down))
            masks.append(None if mask_down is None else mask_down[:, :, ::2])
        masks = masks[:-1]
        mask_mid = masks[-1]
        for resnet, transformers in cast(_MidStages, self.mid_blocks):
            x = resnet(x, mask_mid, next(times), padded)
            x = self._attend(transformers, x, mask_mid, padded)
        for resnet, transformers, upsample in cast(_Stages, self.up_blocks):
            mask_up = masks.pop()
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = resnet(x, mask_up, next(times), padded)
            x = self._attend(transformers, x, mask_up, padded)
            x = upsample(_masked(x, mask_up))
        x = self.final_block(x, mask_up, padded)
        return _masked(self.final_proj(_masked(x, mask_up)), mask)
