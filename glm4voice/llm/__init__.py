"""The GLM-4-Voice-9B language model: checkpoint loading (no remote code), a compact decoder,
quantized weights (int8, fp8, int4: glm4voice.llm.quant), on-device sampling, the streaming engine,
and the quality check of a dtype against bf16 (python -m glm4voice.llm.quality)."""

from glm4voice.llm.checkpoint import CheckpointError, LoadedModel, load_model
from glm4voice.llm.config import ConfigError, GLMConfig
from glm4voice.llm.engine import (
    Engine,
    EngineBusyError,
    EngineConfig,
    EngineError,
    EngineNotRunningError,
    EngineStats,
    EngineStoppedError,
    FinishReason,
    GenerationError,
    GenerationStream,
    InvalidPromptError,
    InvalidSamplingParams,
    PromptTooLongError,
    SamplingParams,
)
from glm4voice.llm.model import GLMModel, KVCache

__all__ = [
    "CheckpointError", "ConfigError", "Engine", "EngineBusyError", "EngineConfig", "EngineError",
    "EngineNotRunningError", "EngineStats", "EngineStoppedError", "FinishReason", "GLMConfig", "GLMModel",
    "GenerationError", "GenerationStream", "InvalidPromptError", "InvalidSamplingParams", "KVCache", "LoadedModel",
    "PromptTooLongError", "SamplingParams", "load_model",
]  # fmt: skip
