"""``WhisperVQConfig``: the speech tokenizer's ``config.json``, read field by field.

The published ``THUDM/glm-4-voice-tokenizer/config.json`` is a transformers-4.44 ``WhisperConfig``
dump plus the Whisper-VQ fields (pooling, quantisation, causal flags). Every field that file
carries is a typed attribute here; most Whisper decoder/training leftovers do not affect
tokenisation but are kept so that a config round-trips. A key that is neither one of these nor a
field that transformers' own ``WhisperConfig`` knows is an error (a typo such as
``pooling_kernal_size`` must not silently fall back to a default).

Defaults are those of the original ``WhisperVQConfig`` (on top of transformers' ``WhisperConfig``
defaults), so a file that leaves a field out means what it meant to the original.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
POOLING_TYPES = ("avg", "max")

# JSON keys whose attribute name differs (a dataclass field should not start with "_").
_JSON_TO_FIELD = {"_name_or_path": "name_or_path"}
_FIELD_TO_JSON = {value: key for key, value in _JSON_TO_FIELD.items()}


class ConfigError(ValueError):
    """A speech tokenizer config.json that cannot be used."""


@dataclass(frozen=True)
class WhisperVQConfig:
    """All fields of the published speech tokenizer ``config.json`` (sorted as in the file)."""

    name_or_path: str = ""
    activation_dropout: float = 0.0
    activation_function: str = "gelu"
    apply_spec_augment: bool = False
    architectures: tuple[str, ...] | None = None
    attention_dropout: float = 0.0
    begin_suppress_tokens: tuple[int, ...] | None = (220, 50256)
    bos_token_id: int | None = 50256
    classifier_proj_size: int = 256
    d_model: int = 384
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    decoder_layerdrop: float = 0.0
    decoder_layers: int = 4
    decoder_start_token_id: int | None = 50257
    dropout: float = 0.0
    encoder_attention_heads: int = 6
    encoder_causal_attention: bool = False
    encoder_causal_convolution: bool = False
    encoder_ffn_dim: int = 1536
    encoder_layerdrop: float = 0.0
    encoder_layers: int = 4
    eos_token_id: int | None = 50256
    init_std: float = 0.02
    is_encoder_decoder: bool = True
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    mask_feature_prob: float = 0.0
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_time_prob: float = 0.05
    max_length: int = 20
    max_source_positions: int = 1500
    max_target_positions: int = 448
    median_filter_width: int = 7
    model_type: str = "whisper"
    num_hidden_layers: int = 4
    num_mel_bins: int = 80
    pad_token_id: int | None = 50256
    pooling_kernel_size: int | None = None
    pooling_position: int = 0
    pooling_type: str = "max"
    quantize_causal_block_size: int | None = None
    quantize_causal_encoder: bool = False
    quantize_commit_coefficient: float = 0.25
    quantize_ema_decay: float | None = None
    quantize_encoder_only: bool = False
    quantize_loss_scale: float = 1.0
    quantize_position: int = 16
    quantize_restart_interval: int | None = None
    quantize_vocab_size: int | None = None
    scale_embedding: bool = False
    skip_language_detection: bool = False
    torch_dtype: str | None = None
    transformers_version: str | None = None
    use_cache: bool = True
    use_weighted_layer_sum: bool = False
    vocab_size: int = 51865
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """Keys that transformers' WhisperConfig knows but this file format does not use (kept for round trips)."""

    # --- reading and writing -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> WhisperVQConfig:
        """Build from a parsed ``config.json``; unknown keys raise :class:`ConfigError`."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a speech tokenizer config must be a JSON object, got {type(values).__name__}")
        own = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            name = _JSON_TO_FIELD.get(key, key)
            if name in own:
                kwargs[name] = tuple(value) if isinstance(value, list) else value
            elif key in _recognised_whisper_keys():
                extra[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ConfigError(
                f"unknown field(s) in the speech tokenizer config: {', '.join(sorted(unknown))} "
                "(neither Whisper-VQ nor Whisper fields; check the spelling)"
            )
        if extra:
            logger.debug("speech tokenizer config: Whisper fields not used for tokenisation: %s", sorted(extra))
        config = cls(**kwargs, extra=extra)
        config.validate()
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> WhisperVQConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise ConfigError(f"no {path.name} in {path.parent}") from error
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from error
        return cls.from_dict(values)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path) -> WhisperVQConfig:
        """Read ``config.json`` from a checkpoint folder or hub id."""
        from glm4voice.hub import resolve_checkpoint

        return cls.from_json_file(resolve_checkpoint(path_or_hub_id) / CONFIG_FILE)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (keys as in the file; tuples as lists; extras included)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[_FIELD_TO_JSON.get(f.name, f.name)] = list(value) if isinstance(value, tuple) else value
        out.update(self.extra)
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        """Formatted like transformers' ``save_pretrained`` (sorted keys, indent 2)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_FILE
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path

    def replace(self, **changes: Any) -> WhisperVQConfig:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    # --- meaning -------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a config the tokenizer cannot run."""
        problems = []

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")

        for name in ("d_model", "encoder_attention_heads", "encoder_ffn_dim", "encoder_layers",
                     "num_mel_bins", "max_source_positions", "quantize_position"):  # fmt: skip
            positive(name)
        if self.quantize_vocab_size is None:
            problems.append("quantize_vocab_size is not set: this is not a quantising (tokenizer) checkpoint")
        else:
            positive("quantize_vocab_size")
        if not problems and self.d_model % self.encoder_attention_heads:
            problems.append(
                f"d_model {self.d_model} is not divisible by encoder_attention_heads {self.encoder_attention_heads}"
            )
        if (
            isinstance(self.quantize_position, int)
            and isinstance(self.encoder_layers, int)
            and self.quantize_position > self.encoder_layers
        ):
            problems.append(f"quantize_position {self.quantize_position} exceeds encoder_layers {self.encoder_layers}")
        if self.pooling_kernel_size is not None:
            positive("pooling_kernel_size")
            if self.pooling_type not in POOLING_TYPES:
                problems.append(f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}")
            if not isinstance(self.pooling_position, int) or not 1 <= self.pooling_position <= self.quantize_position:
                problems.append(
                    f"pooling_position must be in 1..quantize_position ({self.quantize_position}) when pooling is "
                    f"configured, got {self.pooling_position!r}"
                )
        if self.quantize_causal_block_size is not None:
            positive("quantize_causal_block_size")
        from transformers.activations import ACT2FN

        if self.activation_function not in ACT2FN:
            problems.append(f"unknown activation_function {self.activation_function!r}")
        if problems:
            raise ConfigError("invalid speech tokenizer config: " + "; ".join(problems))

    @property
    def codebook_size(self) -> int:
        """Speech tokens in the codebook (``quantize_vocab_size``, which :meth:`validate` requires)."""
        if self.quantize_vocab_size is None:
            raise ConfigError("quantize_vocab_size is not set: this is not a quantising (tokenizer) checkpoint")
        return self.quantize_vocab_size

    @property
    def pooling(self) -> int:
        """Pooling factor applied before quantisation (1 when there is no pooling)."""
        return self.pooling_kernel_size or 1

    @property
    def attention_is_causal(self) -> bool:
        """Whether the quantising layers use plain causal attention (the original's ``is_causal``)."""
        return self.encoder_causal_attention or self.quantize_causal_encoder

    def to_whisper_config(self):
        """The transformers ``WhisperConfig`` that its encoder layers need (SDPA attention)."""
        from transformers import WhisperConfig

        config = WhisperConfig(
            d_model=self.d_model,
            encoder_layers=self.quantize_position,
            encoder_attention_heads=self.encoder_attention_heads,
            encoder_ffn_dim=self.encoder_ffn_dim,
            activation_function=self.activation_function,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout,
            num_mel_bins=self.num_mel_bins,
            max_source_positions=self.max_source_positions,
        )
        config._attn_implementation = "sdpa"
        return config


@functools.cache
def _recognised_whisper_keys() -> frozenset[str]:
    from transformers import PretrainedConfig, WhisperConfig

    return frozenset(WhisperConfig().to_dict()) | frozenset(PretrainedConfig().to_dict())
