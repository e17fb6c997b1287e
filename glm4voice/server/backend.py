"""What the server needs from an LLM engine, and the adapter onto ``glm4voice.llm.engine``.

The server talks to a :class:`TokenBackend`: start/stop, the model's vocabulary size and stop ids,
``submit(prompt_ids, request) -> TokenStream`` (raising :class:`EngineRejected` for refusals the
client should see as 4xx/503, at submission or, for a remote engine, from the stream before its
first token), and a flat dict of engine figures for ``/health`` and ``/metrics`` (optionally
``counter_names``: which of them only grow). Optionally ``max_seq_len`` (prompt limit + 1) and
``add_failure_callback(callback)``: call ``callback(error)`` on the event loop if the engine dies for
good (the server then ends its streams and exits non-zero).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from glm4voice.server.schema import GenerateRequest
from glm4voice.server.streaming import EngineRejected, TokenStream

__all__ = ["EngineRejected", "TokenBackend", "TokenStream"]


class TokenBackend(Protocol):
    vocab_size: int
    """Prompt ids must be below this (the model's embedding rows)."""
    checkpoint_folder: Path
    """The folder with ``tokenizer.model`` / ``tokenizer_config.json``."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def submit(self, prompt_ids: list[int], request: GenerateRequest) -> TokenStream: ...
    def stats(self) -> dict[str, float]: ...
