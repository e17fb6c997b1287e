"""Settings of the token server (one frozen object, kept in ``app.state``; no module globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from glm4voice.defaults import (
    LLM_DTYPE,
    MAX_CONCURRENT_STREAMS,
    MAX_NEW_TOKENS_CAP,
    MAX_QUEUE,
    MAX_SEQ_LEN,
    QUEUE_TIMEOUT_S,
    RETRY_AFTER_S,
    TOKEN_SERVER_HOST,
    TOKEN_SERVER_PORT,
)
from glm4voice.devices import llm_dtypes
from glm4voice.hub import PUBLISHED_LLM
from glm4voice.request_guard import HostPolicy
from glm4voice.serving import ConnectionLimits

DEFAULT_SHUTDOWN_GRACE_S = 5.0
MAX_BODY_BYTES_PER_TOKEN = 64
"""Body size limit per allowed prompt token: an audio token is 15 characters of prompt text
(``<|audio_12345|>``), and JSON escapes may take 6 bytes per character."""
MIN_MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerSettings:
    host: str = TOKEN_SERVER_HOST
    port: int = TOKEN_SERVER_PORT
    model_path: str = PUBLISHED_LLM
    dtype: str = LLM_DTYPE
    quant_method: str | None = None
    """How a quantized ``dtype`` is implemented (e.g. ``hqq`` for int4; glm4voice.llm.quant); None: its default."""
    device: str = "cuda:0"
    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    """Streams generated at once (the engine's batch size)."""
    max_queue: int = MAX_QUEUE
    """Requests that may wait for a free stream; beyond that the answer is 503."""
    queue_timeout_s: float = QUEUE_TIMEOUT_S
    """A request that waited this long for a stream gets 503."""
    max_seq_len: int = MAX_SEQ_LEN
    """Prompt plus generated tokens per stream (the engine's KV cache length)."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (413 beyond); default ``max_seq_len - 1``."""
    max_new_tokens_cap: int = MAX_NEW_TOKENS_CAP
    """Largest ``max_new_tokens`` accepted (422 beyond). A request whose prompt plus
    ``max_new_tokens`` exceeds ``max_seq_len`` is served up to ``max_seq_len``."""
    eager: bool = False
    """Run the engine without CUDA graphs / compilation."""
    retry_after_s: int = RETRY_AFTER_S
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    log_level: str = "info"
    allowed_hosts: tuple[str, ...] = ()
    """Host names answered to besides the loopback names and ``host`` (glm4voice.request_guard)."""
    connection_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    """Header-read timeout and connection cap (glm4voice.serving); the header timeout also bounds
    reading a request body."""

    def __post_init__(self) -> None:
        if self.dtype not in llm_dtypes():
            raise ValueError(f"dtype must be one of {', '.join(llm_dtypes())}, got {self.dtype!r}")
        if self.quant_method is not None:
            from glm4voice.llm.quant import method_for  # torch: only when a method is asked for

            method_for(self.dtype, self.quant_method)  # ValueError naming what is wrong
        for name in ("port", "max_concurrent_streams", "max_seq_len", "max_new_tokens_cap", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, got {self.max_queue}")
        if not self.queue_timeout_s > 0:
            raise ValueError(f"queue_timeout_s must be positive, got {self.queue_timeout_s}")
        HostPolicy.for_server(self.host, self.allowed_hosts)  # raises for a name that cannot be a host
        if self.max_prompt_tokens is not None and not 1 <= self.max_prompt_tokens < self.max_seq_len:
            raise ValueError(
                f"max_prompt_tokens must be in [1, max_seq_len={self.max_seq_len}), got {self.max_prompt_tokens}"
            )

    @property
    def weights(self) -> str:
        """What the engine's linear layers hold: the dtype, or for a quantized one its method (``int4:tinygemm``)."""
        from glm4voice.llm.quant import method_for

        method = method_for(self.dtype, self.quant_method)
        return self.dtype if method is None else method.spec

    @property
    def host_policy(self) -> HostPolicy:
        return HostPolicy.for_server(self.host, self.allowed_hosts)

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_tokens if self.max_prompt_tokens is not None else self.max_seq_len - 1

    @property
    def max_body_bytes(self) -> int:
        return max(MIN_MAX_BODY_BYTES, self.prompt_limit * MAX_BODY_BYTES_PER_TOKEN)
