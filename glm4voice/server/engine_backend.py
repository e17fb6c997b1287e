"""Adapter from ``glm4voice.llm.engine`` (the batching engine) to the server's :class:`TokenBackend`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from glm4voice.hub import resolve_checkpoint
from glm4voice.llm.checkpoint import ALLOW_PATTERNS
from glm4voice.llm.engine import (
    Engine,
    EngineBusyError,
    EngineConfig,
    EngineNotRunningError,
    PromptTooLongError,
    SamplingParams,
)
from glm4voice.server.schema import GenerateRequest
from glm4voice.server.settings import ServerSettings
from glm4voice.server.streaming import EngineRejected, TokenStream

logger = logging.getLogger("glm4voice.server")

ENGINE_GAUGES = frozenset({"running", "active_streams", "queued", "held_streams"})
"""Fields of ``EngineStats`` that go up and down; every other field only grows (a counter)."""


class EngineBackend:
    """Thin wrapper: request fields -> ``SamplingParams`` (the engine adds the checkpoint's stop
    ids itself), engine refusals -> HTTP statuses, ``EngineStats`` -> a flat dict of numbers."""

    is_token_backend = True

    def __init__(self, engine: Engine, model_path: str | Path):
        self.engine = engine
        self.model_path = model_path

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def checkpoint_folder(self) -> Path:
        """Where the tokenizer files are (the hub cache for a hub id: resolved, not downloaded twice)."""
        return resolve_checkpoint(self.model_path, allow_patterns=ALLOW_PATTERNS)

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()

    def submit(self, prompt_ids: list[int], request: GenerateRequest) -> TokenStream:
        params = SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            max_new_tokens=request.max_new_tokens,
            seed=request.seed,
        )
        try:
            return self.engine.submit(prompt_ids, params)
        except EngineBusyError as error:
            raise EngineRejected(503, f"the engine queue is full: {error}; retry later", retry_after=True) from error
        except EngineNotRunningError as error:
            raise EngineRejected(503, f"the engine is not running: {error}", retry_after=True) from error
        except PromptTooLongError as error:
            raise EngineRejected(413, str(error)) from error
        except ValueError as error:
            raise EngineRejected(422, f"invalid request: {error}") from error

    def add_failure_callback(self, callback: Callable[[BaseException], object]) -> None:
        """``callback(error)`` on the event loop if the engine's worker dies (an engine without
        ``add_failure_callback`` is not watched: ``/health`` then reports it stopped)."""
        watch = getattr(self.engine, "add_failure_callback", None)
        if watch is not None:
            watch(callback)
        else:
            logger.warning("this engine cannot report a dead worker: the server will not exit if it dies")

    def make_way(self, starting_tokens: int = 0) -> AbstractContextManager[None]:
        """The engine's :meth:`~glm4voice.llm.engine.Engine.make_way` (no pause for one without it)."""
        make_way = getattr(self.engine, "make_way", None)
        return make_way(starting_tokens) if make_way is not None else nullcontext()

    def stats(self) -> dict[str, float]:
        return dataclasses.asdict(self.engine.stats())

    @property
    def counter_names(self) -> frozenset[str]:
        return frozenset(self.stats()) - ENGINE_GAUGES


def as_backend(engine: Any, settings: ServerSettings) -> Any:
    """``engine`` itself if it already is a token backend, else :class:`EngineBackend` around it."""
    if getattr(engine, "is_token_backend", False):
        return engine
    return EngineBackend(engine, settings.model_path)


def build_engine(settings: ServerSettings, **engine_options: Any) -> Engine:
    """The engine for ``settings`` (built, not started: the server's lifespan loads and warms it);
    ``engine_options``: :class:`Engine` keywords (e.g. ``stop_ids``)."""
    config = EngineConfig(
        device=settings.device,
        dtype=settings.dtype,
        quant_method=settings.quant_method,
        max_batch_size=settings.max_concurrent_streams,
        max_seq_len=settings.max_seq_len,
        # the server admits at most max_concurrent_streams at once; the engine's own queue only
        # holds a stream whose predecessor's cancel it has not processed yet
        max_queue=settings.max_concurrent_streams + settings.max_queue,
        eager=settings.eager,
    )
    return Engine.from_pretrained(settings.model_path, config, **engine_options)
