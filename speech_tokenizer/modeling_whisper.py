"""``WhisperVQEncoder``: the part of the Whisper-VQ encoder that turns log-mel features into codes.

Computation (as the original ``speech_tokenizer/modeling_whisper.py``, inference only):
log-mel (B, n_mels, F) -> conv1 -> GELU -> conv2 (stride 2) -> GELU -> + absolute positions ->
the first ``quantize_position`` Whisper encoder layers (block-causal / causal / padding-masked
attention as configured) with pooling after layer ``pooling_position`` -> nearest codebook row
(squared L2) -> code ids at 1/(2*pooling) of the feature frame rate (12.5 per second).

The encoder layers are transformers' own ``WhisperEncoderLayer`` (same parameter names and
computation as the checkpoint's). Only the layers up to the quantiser are built; the rest of the
published Whisper model is never run or loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speech_tokenizer.configuration_whisper import WhisperVQConfig

logger = logging.getLogger(__name__)

CONV_KERNEL_SIZE = 3
CONV2_STRIDE = 2


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only (``dilation * (kernel - 1)`` zeros), so frame t sees frames <= t.

    Hand-written because the checkpoint's causal convolution has no counterpart in transformers;
    its parameters are a plain Conv1d's (``weight``, ``bias``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, dilation=dilation)
        self.left_padding = dilation * (kernel_size - 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(inputs, (self.left_padding, 0)))


@dataclass(frozen=True)
class WhisperVQOutput:
    """Codes of a batch: ``quantized_token_ids`` (B, T) int64 and ``token_mask`` (B, T) bool
    (False where the code covers only padding)."""

    quantized_token_ids: torch.Tensor
    token_mask: torch.Tensor


class WhisperVQEncoder(nn.Module):
    """The quantising Whisper-VQ encoder; ``from_pretrained`` loads the published folder unchanged.

    Parameter names equal the checkpoint's keys: ``conv1``, ``conv2``, ``embed_positions``,
    ``layers.{0..quantize_position-1}``, ``codebook``, ``embed_positions2``.
    """

    def __init__(self, config: WhisperVQConfig):
        super().__init__()
        config.validate()
        self.config = config
        width = config.d_model
        if config.encoder_causal_convolution:
            self.conv1: nn.Conv1d = CausalConv1d(config.num_mel_bins, width, CONV_KERNEL_SIZE)
            self.conv2: nn.Conv1d = CausalConv1d(width, width, CONV_KERNEL_SIZE, stride=CONV2_STRIDE)
        else:
            self.conv1 = nn.Conv1d(config.num_mel_bins, width, CONV_KERNEL_SIZE, padding=1)
            self.conv2 = nn.Conv1d(width, width, CONV_KERNEL_SIZE, stride=CONV2_STRIDE, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, width)

        from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

        whisper_config = config.to_whisper_config()
        layers = [WhisperEncoderLayer(whisper_config) for _ in range(config.quantize_position)]
        if config.attention_is_causal:
            for layer in layers:
                layer.self_attn.is_causal = True  # plain causal SDPA, no mask (as the original)
        self.layers = nn.ModuleList(layers)
        self.codebook = nn.Embedding(config.codebook_size, width)
        pooled_positions = -(-config.max_source_positions // config.pooling)
        self.embed_positions2 = nn.Embedding(pooled_positions, width)
        """Added to the code vectors by the original after quantisation; loaded, unused for ids."""

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> WhisperVQEncoder:
        """Load ``config.json`` + ``model*.safetensors`` of a tokenizer folder (or hub id) strictly.

        Returns the model in eval mode on ``device`` (CPU by default). The encoder runs in ``dtype``;
        the codebook and the nearest-code search always stay float32.
        """
        from speech_tokenizer.checkpoint import load_encoder

        return load_encoder(cls, path_or_hub_id, device=device, dtype=dtype)

    # --- shape facts ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    @property
    def frames_per_token(self) -> int:
        """Feature frames per code: conv strides times the pooling factor (8 as published)."""
        return self.conv1.stride[0] * self.conv2.stride[0] * self.config.pooling

    # --- computation ---------------------------------------------------------------------------

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> WhisperVQOutput:
        """``input_features`` (B, n_mels, F) log-mel; ``attention_mask`` (B, F), 1 for real frames.

        Inputs on another device are moved to the model's device.
        """
        hidden, mask = self.encode(input_features, attention_mask)
        return WhisperVQOutput(quantized_token_ids=self.quantize(hidden), token_mask=mask)

    def encode(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantiser's input (B, T, d_model) and its mask (B, T): everything but the code search."""
        if input_features.ndim != 3 or input_features.shape[1] != self.config.num_mel_bins:
            raise ValueError(
                f"input_features must be (batch, {self.config.num_mel_bins}, frames), got {tuple(input_features.shape)}"
            )
        batch, _, frames = input_features.shape
        input_features = input_features.to(device=self.device, dtype=self.dtype)
        if attention_mask is None:
            attention_mask = torch.ones(batch, frames, dtype=torch.bool, device=self.device)
        if attention_mask.shape != (batch, frames):
            raise ValueError(f"attention_mask must be {(batch, frames)}, got {tuple(attention_mask.shape)}")
        conv_stride = self.conv1.stride[0] * self.conv2.stride[0]
        mask = attention_mask.to(device=self.device, dtype=torch.bool)[:, ::conv_stride]

        hidden = F.gelu(self.conv1(input_features))
        hidden = F.gelu(self.conv2(hidden)).transpose(1, 2)
        length = hidden.shape[1]
        if length > self.config.max_source_positions:
            raise ValueError(
                f"{frames} feature frames give {length} encoder positions; the model has "
                f"{self.config.max_source_positions} (cut audio into 30 s pieces first)"
            )
        hidden = hidden + self.embed_positions.weight[:length]

        block = self.config.quantize_causal_block_size
        bias = self._attention_bias(mask, block)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, bias)
            if index + 1 == self.config.pooling_position and self.config.pooling_kernel_size is not None:
                hidden = self._pool(hidden)
                mask = mask[:, :: self.config.pooling_kernel_size]
                block = None if block is None else block // self.config.pooling_kernel_size
                bias = self._attention_bias(mask, block)
        return hidden, mask

    def quantize(self, hidden: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row (squared L2, first index on ties), in float32.

        Distances are ``|c|^2 + |x|^2 - 2 x.c`` computed with one ``addmm``, as the original does,
        so that near-ties resolve the same way.
        """
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        codebook = self.codebook.weight.float()
        base = codebook.square().sum(dim=1) + flat.square().sum(dim=1, keepdim=True)
        distances = torch.addmm(base, flat, codebook.t(), beta=1.0, alpha=-2.0)
        return distances.argmin(dim=1).reshape(hidden.shape[:-1])

    def quantized_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """What the original returns as ``last_hidden_state``: code vectors plus ``embed_positions2``."""
        return self.codebook(token_ids) + self.embed_positions2.weight[: token_ids.shape[-1]]

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        kernel = self.config.pooling
        hidden = hidden.transpose(1, 2)
        remainder = hidden.shape[-1] % kernel
        if remainder:
            hidden = F.pad(hidden, (0, kernel - remainder))  # zeros, inside the last window (as the original)
        pool = F.avg_pool1d if self.config.pooling_type == "avg" else F.max_pool1d
        return pool(hidden, kernel).transpose(1, 2)

    def _attention_bias(self, mask: torch.Tensor, block: int | None) -> torch.Tensor | None:
        """Additive attention bias (B, 1, T|1, T): 0 where allowed, the dtype's minimum elsewhere.

        - causal attention: ``None`` (the layers run causal SDPA, padding needs no mask because it
          only ever follows the real frames);
        - block-causal (``quantize_causal_block_size``): query i sees key j if j <= i or both are
          in the same block, and j is not padding;
        - otherwise: every non-padding key.
        """
        if self.config.attention_is_causal:
            return None
        minimum = torch.finfo(self.dtype).min
        if block is None:
            allowed = mask[:, None, None, :]
        else:
            positions = torch.arange(mask.shape[1], device=mask.device)
            causal = positions[None, :] <= positions[:, None]
            same_block = (positions[:, None] // block) == (positions[None, :] // block)
            allowed = (causal | same_block)[None, None] & mask[:, None, None, :]
        zero = torch.zeros((), dtype=self.dtype, device=mask.device)
        return torch.where(allowed, zero, torch.tensor(minimum, dtype=self.dtype, device=mask.device))
