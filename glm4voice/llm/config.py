"""The GLM-4-Voice-9B language model's configuration, read from the published ChatGLM ``config.json``.

The published folder (``THUDM/glm-4-voice-9b``) describes the model with the fields of the
ChatGLM remote code (``model_type: chatglm``). :class:`GLMConfig` keeps the fields that fix the
computation, checks the switches we do not implement, and is frozen.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm4voice.defaults import MAX_SEQ_LEN

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

ROPE_BASE = 10_000.0
"""RoPE base of the ChatGLM code before ``rope_ratio`` scales it."""

DEFAULT_SEQ_LENGTH = MAX_SEQ_LEN
"""A context length for tools that need one number when ``config.json`` states no ``seq_length``
(the transformers view's ``max_position_embeddings``). The engine's own limit is its
``EngineConfig.max_seq_len`` (see :func:`context_limit`). 8192 is what the original's vLLM server
used (max_model_len)."""

CHATGLM_DEFAULT_SEQ_LENGTH = 2048
"""``seq_length`` of the ChatGLM code's config class when ``config.json`` has none: the original
then builds its rotary table for 2048 positions and cannot go past them. The published
glm-4-voice-9b ``config.json`` does not appear to state one."""

PUBLISHED_CONFIG: dict[str, Any] = {
    "_name_or_path": "THUDM/glm-4-voice-9b",
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "architectures": ["ChatGLMForConditionalGeneration"],
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "bias_dropout_fusion": True,
    "classifier_dropout": None,
    "eos_token_id": [151329, 151336, 151338],
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 3.90625e-08,
    "model_type": "chatglm",
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_hidden_layers": 40,
    "num_layers": 40,
    "original_rope": True,
    "pad_token_id": 151329,
    "padded_vocab_size": 168960,
    "post_layer_norm": True,
    "rmsnorm": True,
    "rope_ratio": 1,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.1",
    "use_cache": True,
    "vocab_size": 168960,
}
"""The published ``config.json`` as far as it is known (docs/ORIGINAL.md; no ``seq_length``)."""

PUBLISHED_GENERATION_CONFIG: dict[str, Any] = {
    "do_sample": True,
    "eos_token_id": [151329, 151336, 151338],
    "max_length": 128000,
    "pad_token_id": 151329,
    "temperature": 0.8,
    "top_p": 0.8,
    "transformers_version": "4.44.1",
}
"""The published ``generation_config.json`` (a same-size third-party copy, docs/ORIGINAL.md)."""

# Switches of the ChatGLM code and the only value this implementation computes correctly.
_REQUIRED_SWITCHES = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "add_bias_linear": False,
    "original_rope": True,
    "fp32_residual_connection": False,
}


class ConfigError(ValueError):
    """config.json is missing, malformed, or describes a variant we do not implement."""


@dataclass(frozen=True)
class GLMConfig:
    """Shape and constants of a ChatGLM-format (GLM-4) decoder."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    layernorm_epsilon: float
    rope_ratio: float = 1.0
    seq_length: int | None = None
    """``config.json``'s ``seq_length``; None when it states none (see :func:`context_limit`)."""
    qkv_bias: bool = True
    qkv_per_head: bool = False
    """The checkpoint's ``query_key_value`` rows are grouped per head, ``[q_h | k_h | v_h]`` for each
    head ``h`` (``multi_query_attention: false``, where every head has its own key and value); the
    loader reorders them into this module's ``[q | k | v]``. False: ``[q | k | v]`` as published."""
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
                     "vocab_size", "seq_length"):  # fmt: skip
            value = getattr(self, name)
            if name == "seq_length" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.qkv_per_head and self.num_kv_heads != self.num_heads:
            raise ConfigError("a per-head query_key_value layout needs as many key/value heads as query heads")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"head_dim (kv_channels) {self.head_dim} must be a multiple of 4 (rotary on half)")
        if not self.layernorm_epsilon > 0 or not self.rope_ratio > 0:
            raise ConfigError("layernorm_epsilon and rope_ratio must be positive")

    # --- derived sizes ------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        """Head dims that rotate: the first half of each head (ChatGLM ``RotaryEmbedding(kv_channels // 2)``)."""
        return self.head_dim // 2

    @property
    def rope_base(self) -> float:
        return ROPE_BASE * self.rope_ratio

    def num_parameters(self) -> int:
        per_layer = (
            2 * self.hidden_size  # two RMSNorm weights
            + self.hidden_size * self.qkv_size + (self.qkv_size if self.qkv_bias else 0)
            + self.q_size * self.hidden_size
            + self.hidden_size * 2 * self.ffn_hidden_size
            + self.ffn_hidden_size * self.hidden_size
        )  # fmt: skip
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size + self.hidden_size

    # --- ChatGLM config.json ------------------------------------------------------------------------
    @classmethod
    def from_chatglm(cls, raw: Mapping[str, Any]) -> GLMConfig:
        """Read the ChatGLM fields; reject variants this module would compute wrongly."""
        if raw.get("model_type") != "chatglm":
            raise ConfigError(f"model_type is {raw.get('model_type')!r}; expected 'chatglm' (a glm-4-voice-9b folder)")
        for key, wanted in _REQUIRED_SWITCHES.items():
            if key in raw and bool(raw[key]) != wanted:
                raise ConfigError(f"config.json sets {key}={raw[key]!r}; only {wanted} is implemented")
        try:
            num_heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            head_dim = int(raw["kv_channels"]) if raw.get("kv_channels") is not None else hidden // num_heads
            # ChatGLM: with multi_query_attention, multi_query_group_num key/value heads after all
            # query rows; without it, one key/value head per query head, rows grouped per head
            grouped = bool(raw.get("multi_query_attention", False))
            kv_heads = int(raw["multi_query_group_num"]) if grouped else num_heads
            vocab = int(raw.get("padded_vocab_size") or raw["vocab_size"])
            eos = raw.get("eos_token_id", ())
            seq_length = raw.get("seq_length")
            return cls(
                hidden_size=hidden,
                num_layers=int(raw["num_layers"]),
                num_heads=num_heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                ffn_hidden_size=int(raw["ffn_hidden_size"]),
                vocab_size=vocab,
                layernorm_epsilon=float(raw["layernorm_epsilon"]),
                rope_ratio=float(raw.get("rope_ratio", 1)),
                seq_length=int(seq_length) if seq_length is not None else None,
                qkv_bias=bool(raw.get("add_qkv_bias", False) or raw.get("add_bias_linear", False)),
                qkv_per_head=not grouped,
                eos_token_ids=tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])),
                pad_token_id=None if raw.get("pad_token_id") is None else int(raw["pad_token_id"]),
                torch_dtype=str(raw.get("torch_dtype", "bfloat16")),
            )
        except KeyError as error:
            raise ConfigError(f"config.json lacks the field {error.args[0]!r}") from error
        except (TypeError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"config.json has a malformed field: {error}") from error

    @classmethod
    def from_folder(cls, folder: str | Path) -> GLMConfig:
        return cls.from_chatglm(read_json(Path(folder) / CONFIG_FILE))

    @classmethod
    def published(cls) -> GLMConfig:
        """The real glm-4-voice-9b shape (for meta-device checks and benchmarks)."""
        return cls.from_chatglm(PUBLISHED_CONFIG)


def context_limit(config: GLMConfig, requested: int) -> tuple[int, str]:
    """The number of positions (prompt + reply) an engine serves when asked for ``requested``
    (``EngineConfig.max_seq_len``, the server's ``--max-seq-len``), and why, for the load log.

    ``config.json``'s ``seq_length`` caps it. Without one, the original ChatGLM code stops at
    :data:`CHATGLM_DEFAULT_SEQ_LENGTH` positions; our rotary table has no such limit, so the
    caller's choice is used as it is (say so at load, so nobody is surprised either way)."""
    if config.seq_length is None:
        return requested, (
            f"config.json states no seq_length, with which the original ChatGLM code stops at "
            f"{CHATGLM_DEFAULT_SEQ_LENGTH} positions (its config's default); this engine's rotary positions "
            f"have no such limit and it serves max_seq_len={requested} as configured "
            f"(EngineConfig.max_seq_len, the server's --max-seq-len)"
        )
    if requested > config.seq_length:
        return config.seq_length, (
            f"max_seq_len={requested} was asked for, but config.json's seq_length is {config.seq_length}: "
            f"serving {config.seq_length} positions"
        )
    return requested, f"max_seq_len={requested} as configured (config.json's seq_length {config.seq_length} allows it)"


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"{path} does not exist") from error
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return value


def generation_stop_ids(folder: str | Path, config: GLMConfig) -> frozenset[int]:
    """Ids that end a reply by default: ``generation_config.json``'s ``eos_token_id`` (the
    published ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``), else config.json's."""
    path = Path(folder) / GENERATION_CONFIG_FILE
    if path.is_file():
        eos = read_json(path).get("eos_token_id")
        if eos is not None:
            return frozenset(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return frozenset(config.eos_token_ids)
