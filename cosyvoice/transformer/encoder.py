"""Conformer encoder of the flow (``cosyvoice.transformer.encoder.BlockConformerEncoder`` in config.yaml).

Hand-written: the checkpoint fixes the ESPnet/WeNet layout (``encoders.N.self_attn``,
``feed_forward.w_1/w_2``, ``norm_mha``, ``norm_ff``, ``after_norm``) of pre-norm layers with
relative-position attention; the ``conformer`` package and torch's encoders use other names and
absolute positions. Inference only: dropout arguments are accepted and ignored. The published
decoder uses neither the macaron feed-forward nor the convolution module; asking for them raises.
"""

from __future__ import annotations

import torch
from torch import nn

from cosyvoice.transformer.attention import BlockRelPositionMultiHeadedAttention, RelPositionMultiHeadedAttention
from cosyvoice.transformer.embedding import EspnetRelPositionalEncoding, LinearNoSubsampling

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, max_len) bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, idim: int, hidden_units: int, dropout_rate: float = 0.0, activation: nn.Module | None = None):
        super().__init__()
        del dropout_rate
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = activation if activation is not None else nn.ReLU()
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConformerEncoderLayer(nn.Module):
    """Pre-norm layer: x += attn(norm_mha(x)); x += ff(norm_ff(x))."""

    def __init__(self, size: int, self_attn: nn.Module, feed_forward: nn.Module):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.norm_ff = nn.LayerNorm(size, eps=1e-5)
        self.norm_mha = nn.LayerNorm(size, eps=1e-5)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), key_mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class ConformerEncoder(nn.Module):
    """Stack of :class:`ConformerEncoderLayer` on a linear input layer with ESPnet relative positions.

    ``forward(xs, xs_lens) -> (ys, masks)`` with ``masks`` (B, 1, T) bool, as in the original.
    """

    attention_class: type[RelPositionMultiHeadedAttention] = RelPositionMultiHeadedAttention

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: str = "linear",
        pos_enc_layer_type: str = "rel_pos_espnet",
        normalize_before: bool = True,
        static_chunk_size: int = 0,
        use_dynamic_chunk: bool = False,
        global_cmvn: nn.Module | None = None,
        use_dynamic_left_chunk: bool = False,
        positionwise_conv_kernel_size: int = 1,
        macaron_style: bool = False,
        selfattention_layer_type: str = "rel_selfattn",
        activation_type: str = "swish",
        use_cnn_module: bool = False,
        cnn_module_kernel: int = 15,
        causal: bool = False,
        cnn_module_norm: str = "batch_norm",
        key_bias: bool = True,
        gradient_checkpointing: bool = False,
        block_size: int | None = None,
    ):
        super().__init__()
        unsupported = {
            "input_layer": (input_layer, "linear"),
            "pos_enc_layer_type": (pos_enc_layer_type, "rel_pos_espnet"),
            "normalize_before": (normalize_before, True),
            "static_chunk_size": (static_chunk_size, 0),
            "use_dynamic_chunk": (use_dynamic_chunk, False),
            "macaron_style": (macaron_style, False),
            "use_cnn_module": (use_cnn_module, False),
            "global_cmvn": (global_cmvn, None),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise NotImplementedError(
                    f"{type(self).__name__}: {name}={value!r} is not supported (the published decoder uses {supported!r})"
                )
        if activation_type not in ACTIVATIONS:
            raise ValueError(f"unknown activation_type {activation_type!r}; expected one of {sorted(ACTIVATIONS)}")
        del dropout_rate, positional_dropout_rate, attention_dropout_rate, use_dynamic_left_chunk
        del positionwise_conv_kernel_size, selfattention_layer_type, cnn_module_kernel, causal, cnn_module_norm
        del gradient_checkpointing
        self._output_size = output_size
        self.block_size = block_size
        self.embed = LinearNoSubsampling(input_size, output_size, 0.0, EspnetRelPositionalEncoding(output_size))
        self.encoders = nn.ModuleList(
            ConformerEncoderLayer(
                output_size,
                self._attention(attention_heads, output_size, key_bias, block_size),
                PositionwiseFeedForward(output_size, linear_units, 0.0, ACTIVATIONS[activation_type]()),
            )
            for _ in range(num_blocks)
        )
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def _attention(self, heads: int, size: int, key_bias: bool, block_size: int | None) -> nn.Module:
        return RelPositionMultiHeadedAttention(heads, size, 0.0, key_bias, block_size=block_size)

    def output_size(self) -> int:
        return self._output_size

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks = padding_mask(xs_lens, xs.size(1)).unsqueeze(1)  # (B, 1, T)
        xs, pos_emb = self.embed(xs)
        for layer in self.encoders:
            xs = layer(xs, masks, pos_emb)
        return self.after_norm(xs), masks


class BlockConformerEncoder(ConformerEncoder):
    """The published flow encoder: :class:`ConformerEncoder` with block-causal attention
    (``selfattention_layer_type: block_rel_selfattn``, ``block_size: 10`` tokens)."""

    def __init__(self, input_size: int, output_size: int = 256, *args, block_size: int = 25, **kwargs):
        if args:
            raise TypeError("BlockConformerEncoder takes its options as keyword arguments")
        super().__init__(input_size, output_size, block_size=block_size, **kwargs)

    def _attention(self, heads: int, size: int, key_bias: bool, block_size: int | None) -> nn.Module:
        if block_size is None:  # __init__ always passes one
            raise TypeError("block-causal attention needs a block_size")
        return BlockRelPositionMultiHeadedAttention(heads, size, 0.0, key_bias, block_size=block_size)
