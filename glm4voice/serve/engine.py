"""The ``TokenEngine`` deployment: one token engine per replica (on a GPU: one GPU per replica).

Each replica builds the same backend ``model_server.py`` serves (``glm4voice.server.engine_backend``:
the batching engine, loaded and warmed up before the replica counts as started), and streams one
request's token ids to whoever called :meth:`TokenEngine.generate` (the ingress, or a speech replica)
as :mod:`glm4voice.serve.messages`. Ray Serve routes each call to the replica with the fewest ongoing
requests, never more than the engine's batch at once (``max_ongoing_requests``), and queues the rest.

A replica whose engine died (its worker thread failed: a CUDA error) ends its process, as
``model_server.py`` exits, and Ray replaces it; its open streams have ended with an error already (the
health check fails too, should the exit not happen). Each stream starts with the replica's
own counters (:meth:`TokenEngine.stats`), which the ingress shows at ``GET /replicas``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from glm4voice.defaults import ENGINE_FAILED_EXIT_CODE
from glm4voice.devices import ALLOCATOR_ENV, prefer_expandable_segments
from glm4voice.serve.batches import in_batches
from glm4voice.serve.config import ServeConfig
from glm4voice.serve.messages import Accepted, Failed, Refused, TokenMessage, Tokens
from glm4voice.server.engine_backend import as_backend
from glm4voice.server.schema import GenerateRequest
from glm4voice.server.settings import ServerSettings
from glm4voice.server.streaming import EngineRejected

logger = logging.getLogger("glm4voice.serve")


def load_backend(config: ServeConfig, settings: ServerSettings) -> Any:
    """The token backend of one replica: ``config.engine_factory(settings)`` if given, else the engine
    ``model_server.py`` builds (either way wrapped as the server wraps it)."""
    if config.engine_factory is None:
        from glm4voice.server.engine_backend import build_engine

        return as_backend(build_engine(settings), settings)
    module, _, name = config.engine_factory.partition(":")
    return as_backend(getattr(importlib.import_module(module), name)(settings), settings)


class TokenEngine:
    async def __init__(self, config: ServeConfig):  # type: ignore[misc]  # Ray Serve awaits it
        prefer_expandable_segments()  # this replica's process: before its first CUDA allocation
        self.settings = dataclasses.replace(config.server, device=config.replica_device)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.backend = load_backend(config, self.settings)
        self.failure: BaseException | None = None
        self.accepted = 0
        """Requests this replica has taken."""
        self.streams = 0
        """Of them, those its engine started (the others were refused)."""
        self.open_streams = 0
        """Requests in flight here now (what Ray counts against ``max_ongoing_requests``)."""
        self.refused = 0
        await self.backend.start()
        watch = getattr(self.backend, "add_failure_callback", None)
        if watch is not None:
            watch(self._engine_failed)
        logger.info("engine replica %s ready on %s (pid %d)", self.replica, self.settings.device, os.getpid())

    def _engine_failed(self, error: BaseException) -> None:
        """The engine's worker died (its streams have ended with an error): end this replica's process, as
        ``model_server.py`` exits, so that Ray's routers stop sending it requests at once (a stream that
        has not had a token yet goes to another replica) and Ray starts a new replica."""
        logger.critical("engine replica %s: the engine failed (%s: %s); the replica exits with code %d",
                        self.replica, type(error).__name__, error, ENGINE_FAILED_EXIT_CODE)  # fmt: skip
        self.failure = error
        asyncio.get_running_loop().call_soon(os._exit, ENGINE_FAILED_EXIT_CODE)

    def info(self) -> dict[str, Any]:
        """What a caller needs to check prompts the way the engine will."""
        return {"replica": self.replica, "vocab_size": self.backend.vocab_size,
                "max_seq_len": getattr(self.backend, "max_seq_len", self.settings.max_seq_len),
                "device": self.settings.device}  # fmt: skip

    async def generate(self, prompt_ids: list[int], request: GenerateRequest) -> AsyncIterator[TokenMessage]:
        """One request's stream (see :mod:`glm4voice.serve.messages`); closing it cancels the request."""
        self.open_streams += 1
        self.accepted += 1
        try:
            yield Accepted(self.replica, self.stats())
            try:
                stream = self.backend.submit(prompt_ids, request)
            except EngineRejected as error:
                self.refused += 1
                yield Refused(error.status, error.text, error.retry_after)
                return
            except Exception as error:
                logger.exception("replica %s: the engine refused a request", self.replica)
                yield Failed(str(error))
                return
            self.streams += 1
            try:
                async for ids in in_batches(aiter(stream)):
                    yield Tokens(tuple(ids))
            except Exception as error:  # noqa: BLE001 - the caller hears of it (the error line of its stream)
                logger.warning("replica %s: a stream failed: %s", self.replica, error)
                yield Failed(str(error))
            finally:
                stream.cancel()
        finally:
            self.open_streams -= 1

    def stats(self) -> dict[str, Any]:
        """This replica's own counters and its engine's figures."""
        return {"replica": self.replica, "pid": os.getpid(), "accepted": self.accepted, "streams": self.streams,
                "open_streams": self.open_streams, "refused": self.refused, "failed": self.failure is not None,
                "allocator": os.environ.get(ALLOCATOR_ENV), **self.backend.stats()}  # fmt: skip

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose engine died is replaced."""
        if self.failure is not None:
            raise RuntimeError(f"the engine failed: {type(self.failure).__name__}: {self.failure}")

    async def __del__(self) -> None:
        await self.backend.stop()
