"""Tiny speech tokenizer in the published ``glm-4-voice-tokenizer`` format.

Writes ``config.json`` (every field of the published file; tiny encoder dims), ``model.safetensors``
(the published key layout: un-prefixed encoder keys for the first ``quantize_position`` layers
only, codebook, ``embed_positions2`` and the codebook's EMA buffers) and ``preprocessor_config.json``
(the published Whisper feature extractor: 16 kHz, 128 mel bins, 30 s chunks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from glm4voice.checkpoints.text import TinyVocab

if TYPE_CHECKING:
    from speech_tokenizer.modeling_whisper import WhisperVQEncoder

PUBLISHED_CONFIG: dict[str, Any] = {
    "_name_or_path": "THUDM/glm-4-voice-tokenizer",
    "activation_dropout": 0.0,
    "activation_function": "gelu",
    "apply_spec_augment": False,
    "architectures": ["WhisperVQEncoder"],
    "attention_dropout": 0.0,
    "begin_suppress_tokens": [220, 50257],
    "bos_token_id": 50257,
    "classifier_proj_size": 256,
    "d_model": 1280,
    "decoder_attention_heads": 20,
    "decoder_ffn_dim": 5120,
    "decoder_layerdrop": 0.0,
    "decoder_layers": 32,
    "decoder_start_token_id": 50258,
    "dropout": 0.0,
    "encoder_attention_heads": 20,
    "encoder_causal_attention": False,
    "encoder_causal_convolution": True,
    "encoder_ffn_dim": 5120,
    "encoder_layerdrop": 0.0,
    "encoder_layers": 32,
    "eos_token_id": 50257,
    "init_std": 0.02,
    "is_encoder_decoder": True,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
    "mask_feature_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_time_prob": 0.05,
    "max_length": 448,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "median_filter_width": 7,
    "model_type": "whisper",
    "num_hidden_layers": 32,
    "num_mel_bins": 128,
    "pad_token_id": 50256,
    "pooling_kernel_size": 4,
    "pooling_position": 16,
    "pooling_type": "avg",
    "quantize_causal_block_size": 200,
    "quantize_causal_encoder": False,
    "quantize_commit_coefficient": 0.25,
    "quantize_ema_decay": 0.99,
    "quantize_encoder_only": True,
    "quantize_loss_scale": 10.0,
    "quantize_position": 16,
    "quantize_restart_interval": 100,
    "quantize_vocab_size": 16384,
    "scale_embedding": False,
    "skip_language_detection": True,
    "torch_dtype": "float32",
    "transformers_version": "4.44.1",
    "use_cache": True,
    "use_weighted_layer_sum": False,
    "vocab_size": 51866,
}
"""The published ``config.json`` (docs/ORIGINAL.md; field set as transformers 4.44.1 writes it)."""

PUBLISHED_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "chunk_length": 30,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "WhisperProcessor",
    "return_attention_mask": False,
    "sampling_rate": 16000,
}
"""The published ``preprocessor_config.json`` (340 bytes as written below, like the published file)."""

TINY_OVERRIDES: dict[str, Any] = {
    "_name_or_path": "tiny-random/glm-4-voice-tokenizer",
    "d_model": 64,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 256,
    "encoder_layers": 4,
    "num_hidden_layers": 4,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 256,
    "decoder_layers": 4,
    "quantize_position": 2,
    "pooling_position": 2,
}
"""Tiny dims; 4 layers of config but, like the published file, only the quantising ones in the weights."""

EMA_KEYS = ("ema_count", "ema_weight")


def published_config():
    """The published config as a :class:`WhisperVQConfig` (full size; build it on the meta device)."""
    from speech_tokenizer.configuration_whisper import WhisperVQConfig

    return WhisperVQConfig.from_dict(PUBLISHED_CONFIG)


def tiny_config(num_audio_codes: int):
    from speech_tokenizer.configuration_whisper import WhisperVQConfig

    return WhisperVQConfig.from_dict({**PUBLISHED_CONFIG, **TINY_OVERRIDES, "quantize_vocab_size": num_audio_codes})


PROBE_SECONDS = 12
CODEBOOK_SPREAD = 0.25
LAYER_WEIGHT_GAIN = 0.1
POSITION_GAIN = 0.1


@torch.no_grad()
def init_random_weights(model: WhisperVQEncoder, seed: int) -> None:
    """Deterministic random weights that give varied codes (tests need codes that react to audio).

    Convolutions: normal with std 1/sqrt(fan_in); encoder layers: the same scaled by 0.1 (larger
    random layers wash out the audio); layer norms: identity; positions: Whisper's sinusoids,
    scaled down. Each code is the quantiser's input at a random
    position of a synthetic probe signal plus a little noise, so that different sounds land on
    different codes, as with trained weights.
    """
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same weights on any device
    device = model.conv1.weight.device

    def normal(shape, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * std).to(device)

    for name, parameter in model.named_parameters():
        if name.endswith("layer_norm.weight"):
            parameter.fill_(1.0)
        elif name.endswith(".bias"):
            parameter.copy_(normal(parameter.shape, 0.02))
        elif parameter.ndim >= 2 and name.startswith(("conv", "layers")):
            gain = LAYER_WEIGHT_GAIN if name.startswith("layers") else 1.0
            parameter.copy_(normal(parameter.shape, gain / math.sqrt(math.prod(parameter.shape[1:]))))
    width = model.config.d_model
    model.embed_positions.weight.copy_(
        POSITION_GAIN * _sinusoids(model.embed_positions.weight.shape[0], width).to(device)
    )
    model.embed_positions2.weight.copy_(model.embed_positions.weight[: model.embed_positions2.weight.shape[0]])

    hidden, mask = model.encode(*_probe_features(model))
    probe = hidden[mask].float()
    # Each code: a probe vector plus noise on the scale of the probe's frame-to-frame changes.
    local = (probe[1:] - probe[:-1]).std(dim=0)
    count = model.codebook.weight.shape[0]
    anchors = torch.randint(0, probe.shape[0], (count,), generator=generator).to(device)
    model.codebook.weight.copy_(probe[anchors] + CODEBOOK_SPREAD * local * normal((count, probe.shape[1]), 1.0))


def _probe_features(model: WhisperVQEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of a fixed synthetic signal: gliding harmonic tones at several levels,
    white noise bursts, a steady tone and near-silence, 2 s each."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(**PUBLISHED_PREPROCESSOR_CONFIG)
    rate = extractor.sampling_rate
    time = torch.arange(PROBE_SECONDS * rate, dtype=torch.float64) / rate
    f0 = 110.0 + 90.0 * torch.sin(2 * math.pi * 0.3 * time) ** 2
    phase = 2 * math.pi * torch.cumsum(f0, 0) / rate
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 12)) * torch.sin(2 * math.pi * 1.7 * time).clamp(min=0)
    noise = torch.randn(time.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    part = len(time) // 6
    pieces = [
        0.3 * voiced[:part], 0.03 * voiced[part:2 * part], noise[2 * part:3 * part] * 0.1,
        noise[3 * part:4 * part] * 0.003, 0.2 * torch.sin(2 * math.pi * 440.0 * time[4 * part:5 * part]),
        1e-4 * noise[5 * part:],
    ]  # fmt: skip
    signal = torch.cat(pieces).float().numpy()
    out = extractor([signal], sampling_rate=rate, return_attention_mask=True, return_tensors="pt")
    return out["input_features"].to(model.dtype), out["attention_mask"].bool()


def write_tiny_speech_tokenizer(folder: Path, vocab: TinyVocab, seed: int) -> None:
    from safetensors.torch import save_file

    from speech_tokenizer.modeling_whisper import WhisperVQEncoder

    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(vocab.num_audio_codes)
    torch_state = torch.random.get_rng_state()
    try:
        model = WhisperVQEncoder(config)
    finally:
        torch.random.set_rng_state(torch_state)  # construction must not disturb the caller's RNG
    init_random_weights(model, seed)
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    tensors["ema_count"] = torch.ones(config.codebook_size)
    tensors["ema_weight"] = tensors["codebook.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(PUBLISHED_PREPROCESSOR_CONFIG, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal position table (sin half, cos half)."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inverse = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inverse[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)
