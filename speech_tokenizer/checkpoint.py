"""Strict loading of a speech tokenizer folder (``THUDM/glm-4-voice-tokenizer`` layout).

Two key layouts exist for the same weights:
- encoder-only (the published ``model.safetensors``): ``conv1.*``, ``layers.{i}.*``, ``codebook.weight``...
- full model (``WhisperVQForConditionalGeneration``): the same names under ``model.encoder.``, plus
  ``model.decoder.*`` and ``proj_out.*``.

Every key the encoder needs must be present with the right shape. Keys that are known but not
needed are skipped on purpose (and reported at debug level): encoder layers at or beyond
``quantize_position``, the final encoder ``layer_norm``, the EMA training buffers of the codebook,
and the Whisper decoder. Anything else is an error.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from speech_tokenizer.configuration_whisper import CONFIG_FILE, WhisperVQConfig

logger = logging.getLogger(__name__)

WEIGHTS_PATTERN = "model*.safetensors"
FULL_MODEL_ENCODER_PREFIX = "model.encoder."
FULL_MODEL_DECODER_PREFIXES = ("model.decoder.", "proj_out.")
CHECKPOINT_FILES = (CONFIG_FILE, "model.safetensors", "preprocessor_config.json")

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A tokenizer folder whose weights do not match its config."""


def encoder_layer_shapes(config: WhisperVQConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of one encoder layer (relative to ``layers.{i}.``)."""
    d, ffn = config.d_model, config.encoder_ffn_dim
    return {
        "self_attn.k_proj.weight": (d, d),
        "self_attn.v_proj.weight": (d, d),
        "self_attn.v_proj.bias": (d,),
        "self_attn.q_proj.weight": (d, d),
        "self_attn.q_proj.bias": (d,),
        "self_attn.out_proj.weight": (d, d),
        "self_attn.out_proj.bias": (d,),
        "self_attn_layer_norm.weight": (d,),
        "self_attn_layer_norm.bias": (d,),
        "fc1.weight": (ffn, d),
        "fc1.bias": (ffn,),
        "fc2.weight": (d, ffn),
        "fc2.bias": (d,),
        "final_layer_norm.weight": (d,),
        "final_layer_norm.bias": (d,),
    }


def required_shapes(config: WhisperVQConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the quantising encoder needs, by checkpoint key (encoder-only layout)."""
    d = config.d_model
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (d, config.num_mel_bins, 3),
        "conv1.bias": (d,),
        "conv2.weight": (d, d, 3),
        "conv2.bias": (d,),
        "embed_positions.weight": (config.max_source_positions, d),
    }
    for index in range(config.quantize_position):
        for name, shape in encoder_layer_shapes(config).items():
            shapes[f"layers.{index}.{name}"] = shape
    shapes["codebook.weight"] = (config.codebook_size, d)
    shapes["embed_positions2.weight"] = (-(-config.max_source_positions // config.pooling), d)
    return shapes


def skipped_shape(config: WhisperVQConfig, key: str) -> tuple[str, tuple[int, ...]] | None:
    """For a known-but-unneeded encoder key: (reason, expected shape); ``None`` if it is not one."""
    d = config.d_model
    if key in ("ema_count", "ema_weight"):
        shape = (config.codebook_size,) if key == "ema_count" else (config.codebook_size, d)
        return "codebook EMA training buffers", shape
    if key in ("layer_norm.weight", "layer_norm.bias"):
        return "final encoder layer norm (after the quantiser)", (d,)
    match = _LAYER_KEY.match(key)
    if match:
        index, name = int(match.group(1)), match.group(2)
        layer_shapes = encoder_layer_shapes(config)
        if config.quantize_position <= index < config.encoder_layers and name in layer_shapes:
            return f"encoder layers at or beyond quantize_position {config.quantize_position}", layer_shapes[name]
    return None


@dataclass
class LoadReport:
    """What a load read and what it skipped on purpose."""

    files: list[Path] = field(default_factory=list)
    layout: str = "encoder-only"
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)


def read_encoder_state(folder: Path, config: WhisperVQConfig) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Read the needed tensors from ``folder/model*.safetensors``; raise on any mismatch."""
    from safetensors import safe_open

    files = sorted(folder.glob(WEIGHTS_PATTERN))
    if not files:
        raise CheckpointError(f"no {WEIGHTS_PATTERN} in {folder}")
    required = required_shapes(config)
    report = LoadReport(files=files)
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    wrong_shape: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            full_model = any(key.startswith(FULL_MODEL_ENCODER_PREFIX) for key in keys)
            if full_model:
                report.layout = "full model (model.encoder.* / model.decoder.*)"
            for raw_key in keys:
                key = raw_key
                if full_model:
                    if raw_key.startswith(FULL_MODEL_DECODER_PREFIXES):
                        report.skipped["Whisper decoder"] += 1
                        continue
                    if not raw_key.startswith(FULL_MODEL_ENCODER_PREFIX):
                        unknown.append(raw_key)
                        continue
                    key = raw_key[len(FULL_MODEL_ENCODER_PREFIX) :]
                shape = tuple(handle.get_slice(raw_key).get_shape())
                if key in required:
                    if key in state:
                        raise CheckpointError(f"{raw_key} appears twice in {folder}")
                    if shape != required[key]:
                        wrong_shape.append(f"{raw_key}: file {shape}, config {required[key]}")
                        continue
                    state[key] = handle.get_tensor(raw_key)
                    continue
                skip = skipped_shape(config, key)
                if skip is None:
                    unknown.append(raw_key)
                elif shape != skip[1]:
                    wrong_shape.append(f"{raw_key}: file {shape}, config {skip[1]}")
                else:
                    report.skipped[skip[0]] += 1
    missing = sorted(set(required) - set(state))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_sample(missing)}")
    if unknown:
        problems.append(f"unexpected {len(unknown)} key(s): {_sample(sorted(unknown))}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es): {_sample(wrong_shape)}")
    if problems:
        raise CheckpointError(f"the weights in {folder} do not match its {CONFIG_FILE}: " + "; ".join(problems))
    report.loaded = len(state)
    return state, report


def load_encoder(model_class, path_or_hub_id, *, device=None, dtype: torch.dtype = torch.float32):
    """Build ``model_class(config)`` without allocating, then fill it from the folder's safetensors."""
    from glm4voice.hub import resolve_checkpoint

    folder = resolve_checkpoint(path_or_hub_id, allow_patterns=list(CHECKPOINT_FILES) + [WEIGHTS_PATTERN])
    config = WhisperVQConfig.from_json_file(folder / CONFIG_FILE)
    state, report = read_encoder_state(folder, config)
    with torch.device("meta"):
        model = model_class(config)
    converted = {key: tensor.to(torch.float32 if key == "codebook.weight" else dtype) for key, tensor in state.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    logger.debug(
        "loaded %d tensors from %s (%s layout); skipped on purpose: %s",
        report.loaded,
        ", ".join(path.name for path in report.files),
        report.layout,
        ", ".join(f"{count} key(s): {reason}" for reason, count in sorted(report.skipped.items())) or "nothing",
    )
    return model


def _sample(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
